"""The rule data of prompt-injection screening: override phrases, templates, leads.

Each :class:`Rule` is a regular expression with its category and weight, the
text view it runs on (``plain``, ``folded`` or ``visible``; see
:func:`bastion.safety.injection.normalise.text_views`) and the literal leads every
match starts with, so the engine tries the regex only where a lead occurs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from bastion.safety.injection.normalise import unmarked

_GAP = r"(?:\W+\w+){0,3}?\W+"  # up to three filler words ("ignore all of the previous…")
_CJK_GAP = r".{0,6}?"


# Filler words between a rule's words, as written: a lazy count of word runs.
# Each run is made possessive (Python 3.11 ``re``), which changes no match, only
# the cost of a failed try (the regex no longer gives a run back one character
# at a time): in "(?:\W+\w+){0,n}?" the \W+ is followed by \w, which it
# cannot match, so any match takes the whole non-word run; the \w+ is followed
# by \W+ (the next filler word, or the \W+ after the group, kept as written),
# so any match takes the whole word. A match is then found by the same path,
# the greedy one, whether the run may be given back or not. Likewise
# "(?:\w+\W+){0,n}?" (its \w+ followed by \W) and "(?:\w+\s+){0,n}?" (its
# \w+ followed by \s). Only a group followed by what its last run cannot
# match is rewritten (tests/injection/test_bounds.py compares every rule's
# matches as written and as rewritten).
_FILLERS = (
    (re.compile(r"\(\?:\\W\+\\w\+\)(\{0,\d+\}\?)(?=\\W\+)"), r"(?:\\W++\\w++)\1"),
    (re.compile(r"\(\?:\\w\+\\W\+\)(\{0,\d+\}\?)"), r"(?:\\w++\\W+)\1"),
    (re.compile(r"\(\?:\\w\+\\s\+\)(\{0,\d+\}\?)"), r"(?:\\w++\\s+)\1"),
)


def _possessive(pattern: str) -> str:
    """``pattern`` with the word runs of its filler groups possessive (same matches)."""
    for filler, possessive in _FILLERS:
        pattern = filler.sub(possessive, pattern)
    return pattern


@dataclass(frozen=True)
class Rule:
    rule: str
    category: str
    weight: int
    pattern: re.Pattern[str]
    view: Literal["plain", "folded", "visible"]
    leads: tuple[str, ...]  # every match starts where one of these does
    line_start: bool  # and, when marked ``(?#line)``, at the start of a line


def _r(
    rule: str,
    category: str,
    weight: int,
    pattern: str,
    view: Literal["plain", "folded", "visible"] = "folded",
    *,
    leads: str,
) -> Rule:
    words = leads.split("|")
    if view != "visible":
        # The views read a run of whitespace as one space or line break: a
        # space in a pattern is either (in a class too). They
        # read Latin letters without their marks: so are the rules written.
        pattern = unmarked(pattern).replace(" ", r"\s")
        words = list(dict.fromkeys(map(unmarked, words)))
    compiled = re.compile(_possessive(pattern), re.S)
    return Rule(rule, category, weight, compiled, view, tuple(words), "(?#line)" in pattern)


_IGNORE = (
    r"(?:ignore|ignoring|disregard|forget|skip|override|bypass|neglect|overlook|drop|abandon|"
    r"discard|nevermind)"
)
_PRIOR = (
    r"(?:previous|prior|above|earlier|preceding|former|original|initial|system|developer|"
    r"all|any|your|these|those|foregoing)"
)
_INSTR = (
    r"(?:instructions?|prompts?|rules|directions?|directives?|guidelines|commands?|orders|"
    r"programming|guardrails|constraints|restrictions|context|policies)"
)
_DATA = (
    r"(?:tickets?|documents?|data|database|conversations?|e-?mails?|records|customers?|users?|"
    r"files|messages|history|passwords?|secrets?|keys|credentials|chats?|context|tokens|"
    r"contacts|accounts|invoices|everything)"
)


_AI_READERS = ("assistant", "ai", "model", "bot", "chatbot", "agent", "llm")
_FROM_NOW_ON = ("now", "henceforth", "from now on")
_DESCRIBED = r"(?:ignores|disregards|forgets|overrides|bypasses|discards)\b"


def _behind(*words: str) -> str:
    """A group that matches where one of ``words`` and a space or line break
    (an apostrophe: none) come just before: look-behinds, each of fixed width
    (the views read a run of whitespace as one character), one per width, so
    that a try costs a few of them, not one per word."""
    by_width: dict[int, list[str]] = {}
    for word in words:
        spelt = word if word.endswith(("'", "\u2019")) else f"{word}\\s"
        width = len(spelt.replace("\\b", "").replace("\\s", " "))
        if "\\" in spelt.replace("\\b", "").replace("\\s", ""):
            raise ValueError(f"{word!r}: a look-behind word is literal")
        by_width.setdefault(width, []).append(spelt)
    return "(?:" + "|".join(f"(?<={'|'.join(group)})" for group in by_width.values()) + ")"


def _not_behind(*words: str) -> str:
    """Look-behinds that fail where one of ``words`` (a whole word) and a space
    or line break come just before: one per length of word (a look-behind is
    of one width), so that a try costs a few of them."""
    by_length: dict[int, list[str]] = {}
    for word in words:
        by_length.setdefault(len(word), []).append(word)
    return "".join(
        f"(?<!\\b(?:{'|'.join(group)})\\s)" for _length, group in sorted(by_length.items())
    )


# French auxiliaries (avoir) and adverbs that come before a past participle:
# "j'ai oublié", "il a ignoré", "tu as déjà oublié", "on n'a pas ignoré" (the
# views read words without their marks: "deja").
_FR_AUXILIARIES = (
    "ai", "a", "as", "avons", "avez", "ont", "avais", "avait", "avions", "aviez", "avaient",
    "aurai", "aura", "auras", "aurons", "aurez", "auront", "aurais", "aurait", "aurions",
    "auriez", "auraient", "pas", "jamais", "deja", "bien", "tout", "completement", "presque",
    "vite",
)  # fmt: skip


# Sending a bulk of data, per language (``exfil.send-data-multilingual``).
_SEND_ML = (
    # "send", "mail" and "export" are the English rule's leads too (one hit, two rules).
    "send|mail|export|schick|leite|übermittel|übertrag|lade|kopier|teile|weiterleit"
    "|envía|envia|reenvía|reenvia|manda|sube|transfiere|copia|comparte|sincroniza"
    "|envoi|envoy|transfère|transfere|transmet|téléverse|partage|synchronise|fais|faites"
    "|invia|inoltra|carica|trasferisc|condivid|sincronizz|esporta"
)
_SENDING = _SEND_ML.replace("fais|faites", r"fai(?:s|tes)\s+suivre")
_BULK = (
    r"alle[nrs]?|sämtliche[nrs]?|jede[nrsm]?|(?:die|den|das)\s+(?:gesamte|komplette|vollständige)n?"
    r"|tod[oa]s?|cada|tous|toutes|tout|chaque|l['\u2019](?:intégralité|ensemble)|la\s+totalité"
    r"|tutt[ioae]|ogni|l['\u2019]inter[oa]"
)
_DATA_ML = (
    r"tickets?|dokument|daten|gespräch|unterhaltung|e-?mails?|nachricht|kunden|nutzer|benutzer"
    r"|dateien|verlauf|chatverlauf|passw|geheimnis|schlüssel|zugangsdaten|konten|rechnung|kontakt"
    r"|documento|datos|base\s+de\s+datos|conversacion|correo|mensaje|cliente|usuario|archivo"
    r"|historial|contraseña|secreto|clave|credencial|contacto|cuenta|factura|registro"
    r"|document|données|base\s+de\s+données|conversation|courriel|message|client|utilisateur"
    r"|fichier|historique|mots\s+de\s+passe|clés|identifiant|compte|facture|dossier"
    r"|dati|conversazion|messaggi|clienti|utenti|file|cronologia|storico|password|segreti|chiavi"
    r"|credenziali|chat|contatti|account|fatture|registri"
)

# Machine readers by name, per language (what the "addressed" rules look for).
_SAFETY_NOUN = (
    r"(?:(?:output\s+|content\s+)?moderation(?:\s+layer)?|moderaci[oó]n|mod[ée]ration|moderazione"
    r"|guardrails|safeguards|salvaguardas|garde-fous|safety\s+(?:checks?|filters?|layer|rules"
    r"|polic(?:y|ies)|guidelines)|content\s+(?:polic(?:y|ies)|filters?|restrictions)"
    r"|sicherheitsrichtlinien|sicherheitsfilter|inhaltsfilter|alignment(?:-schicht)?"
    r"|pol[íi]ticas\s+de\s+contenido|filtros\s+de\s+(?:seguridad|contenido)"
    r"|filtres\s+de\s+(?:s[ée]curit[ée]|contenu)|filtri\s+di\s+(?:sicurezza|contenuto)"
    r"|restricciones\s+de\s+contenido|restrictions\s+de\s+contenu|restrizioni\s+(?:sui|dei)\s+contenuti)"
)
_AI_DE = r"(?:ki|llm|sprachmodell\w*|chatbot\w*|ki-\w+)"
_AI_ES = (
    r"(?:ia|llm|modelos?\s+de\s+lenguaje|chatbots?|asistentes?\s+(?:de\s+|con\s+)?ia"
    r"|agentes?\s+(?:de\s+)?ia)"
)
_AI_FR = (
    r"(?:ia|llm|mod[èe]les?\s+de\s+langage|chatbots?|assistants?\s+(?:d['\u2019]\s*)?ia"
    r"|agents?\s+(?:d['\u2019]\s*)?ia)"
)
_AI_IT = (
    r"(?:ia|ai|llm|modell[oi]\s+linguistic[oi]|chatbot|assistent[ei]\s+(?:ia|ai|virtual[ei])"
    r"|agent[ei]\s+(?:ia|ai))"
)

# Automated readers named by what they do ("the mailbox assistant", "AI agent",
# "bot revisor"), per language, and the orders given to them: what the
# ``addressed.machine-agent`` rule looks for. Bare "assistant", "agent" and
# "reviewer" are people in office documents and support scripts; here each
# comes with a word that makes it a machine.
_MACHINE_EN = (
    r"(?:(?:ai|llm|gpt|automated|automatic|autonomous)[\s-]+(?:[\w-]+\s+)?"
    r"(?:assistants?|agents?|bots?|reviewers?|copilots?|pipelines?|workers?|models?)"
    r"|(?:coding|code|mail|mailbox|e-?mail|inbox|browsing|browser|shopping|procurement|purchasing"
    r"|scheduling|calendar)[\s-]+(?:assistants?|agents?|bots?|copilots?))"
)
_ACTION_EN = (
    r"(?:forward|send|share|grant|give|approve|merge|pay|transfer|delete|remove|call|execute|run"
    r"|invoke|accept|add|mark|upload|e-?mail|post|copy|commit|push|disable|fill|submit|schedule"
    r"|book|purchase|buy|order|change|update|reset|export|fetch|visit|cancel|refund|create|invite"
    r"|archive|move|set|use|reply|respond|tell|say|recommend|include|attach)"
)
_MACHINE_DE = (
    r"(?:(?:ki|llm|e-?mail|mail|postfach|code|coding|programmier|einkaufs|kalender|browser)"
    r"[\s-]?(?:assistent|agent|bot)\w*|automatische\w*\s+(?:\w+)?prüfung|automatisierte\w*\s+\w+)"
)
_ACTION_DE = (
    r"(?:leite|schick|schicke|sende|teile|gib|gewähre|genehmige|überweise|zahle|lösche|rufe?"
    r"|führe|starte|akzeptiere|füge|markiere|lade|kopiere|ändere|setze|storniere|erstatte|öffne"
    r"|bestelle|kaufe|buche|antworte|sag|sage|trage|nimm|erteile)"
)
_MACHINE_ES = (
    r"(?:(?:agentes?|asistentes?|bots?)\s+(?:(?:de|del|con)\s+)?(?:ia|correo|código|codigo|compras"
    r"|pagos|facturación|calendario|navegador|revisi[oó]n|automátic[oa]|automatizad[oa])"
    r"|bots?\s+revisor(?:es)?)"
)
_ACTION_ES = (
    r"(?:reenvía|reenvia|envía|envia|manda|comparte|concede|da|otorga|aprueba|fusiona|paga"
    r"|transfiere|borra|elimina|llama|ejecuta|invoca|acepta|añade|marca|sube|copia|desactiva"
    r"|rellena|compra|cancela|reembolsa|crea|cambia|usa|abre|visita|responde|dile|di)"
)
_MACHINE_FR = (
    r"(?:(?:agents?|assistants?|bots?)\s+(?:(?:d['\u2019]\s*|de\s+|du\s+)?(?:ia|achats?|messagerie"
    r"|courriel|code|paiement|facturation|agenda|navigateur|revue))(?:\s+automatisée?s?)?"
    r"|(?:agents?|assistants?|bots?)\s+automatisée?s?)"
)
_ACTION_FR = (
    r"(?:transfère|transfere|transmets|envoie|partage|accorde|donne|approuve|fusionne|paie|paye"
    r"|vire|supprime|efface|appelle|exécute|execute|lance|accepte|ajoute|marque|téléverse|copie"
    r"|désactive|remplis|achète|passe|annule|rembourse|crée|modifie|utilise|ouvre|visite|règle"
    r"|réponds|dis)"
)
_MACHINE_IT = (
    r"(?:(?:agent[ei]|assistent[ei]|bot)\s+(?:(?:di|della|del|dell['\u2019]|con)\s*)?(?:ia|ai|posta"
    r"|codice|acquisti|pagamenti|fatturazione|calendario|browser|revisione|accesso\s+al\s+browser))"
)
_ACTION_IT = (
    r"(?:inoltra|invia|manda|condividi|concedi|dai|approva|unisci|paga|trasferisci|cancella"
    r"|elimina|chiama|esegui|avvia|accetta|aggiungi|segna|carica|copia|disattiva|compila|compra"
    r"|acquista|annulla|rimborsa|crea|modifica|usa|apri|visita|rispondi|di|dì)"
)

RULES: tuple[Rule, ...] = (
    # instruction override
    _r(
        "override.en",
        "override",
        55,
        # Not reported speech ("my manager told me to ignore the old lead's
        # instructions"): "me to" before the verb makes the speaker the one who ignores.
        rf"(?<!\bme to )\b{_IGNORE}\b{_GAP}{_PRIOR}\b(?:{_GAP})??{_INSTR}\b",
        leads="ignor|disregard|forget|skip|overrid|bypass|neglect|overlook|drop|abandon|discard|nevermind",
    ),
    # The same order told as what the assistant now does ("The assistant now
    # ignores all previous instructions ...", "From now on the AI ignores its
    # previous instructions"): English spells the third person apart
    # ("ignores"), so override.en reads only the imperative; German, French,
    # Italian and Spanish spell both alike and their rules read both. Told
    # from now on, or of all of them: a bug report ("the model ignores
    # previous instructions when the context fills up") is neither.
    _r(
        "override.en-described",
        "override",
        55,
        # The verb first: a try elsewhere then fails at once, not after the
        # look-behinds (a megabyte of the verbs and nothing else took seconds).
        f"(?={_DESCRIBED})(?:"
        + _behind(
            *(rf"\b{reader} {when}" for reader in _AI_READERS for when in _FROM_NOW_ON),
            *(
                rf"\b{when}{article} {reader}"
                for reader in _AI_READERS
                for when in (*_FROM_NOW_ON, "from now on,")
                for article in ("", " the", " this", " your")
            ),
        )
        + _DESCRIBED
        + "|"
        + _behind(*(rf"\b{reader}" for reader in _AI_READERS))
        + _DESCRIBED
        + r"(?=\s+all\b))"
        rf"{_GAP}(?:previous|prior|earlier|above|preceding|original|initial|former)\b"
        rf"(?:{_GAP})??{_INSTR}\b",
        leads="ignores|disregards|forgets|overrides|bypasses|discards",
    ),
    _r(
        "override.en-everything",
        "override",
        50,
        r"\b(?:ignore|forget|disregard)\s+(?:everything|all\s+(?:of\s+)?that|what)\b"
        r"(?:\W+\w+){0,4}?\W+(?:above|before|earlier|previously|told|said|instructed)\b"
        r"|\b(?:ignore|disregard|forget|never\s+mind)\s+(?:the\s+rest\s+of|everything\s+else|all\s+other|"
        r"(?:the\s+)?other\s+content|the\s+remaining)\b"
        r"|\b(?:ignore|disregard|forget|never\s+mind)\s+(?:the\s+|your\s+)?(?:rules|instructions|prompt)\s+"
        r"(?:you\s+(?:were|have\s+been)\s+(?:given|told))"
        r"|\bstop\s+everything\b",
        leads="ignore|forget|disregard|never|stop",
    ),
    _r(
        "override.en-do-not-follow",
        "override",
        50,
        # Not a relative clause ("claims that don't follow these rules").
        rf"(?<!\bthat )(?<!\bwhich )(?<!\bwho )"
        rf"\b(?:do\s+not|don'?t|never|stop)\s+(?:follow|obey|listen|apply)(?:ing)?\b(?:\s+to)?{_GAP}"
        rf"(?:previous|prior|above|original|system|your|those|these)\b(?:{_GAP})??{_INSTR}\b",
        leads="do|don|never|stop",
    ),
    _r(
        "override.en-new-instructions",
        "override",
        50,
        r"\b(?:new|updated|real|actual|revised|important|additional|secret|hidden)\s+"
        r"(?:system\s+)?(?:instructions?|directives?|task|orders)\s*(?::|-|follow|are\b)",
        leads="new|updated|real|actual|revised|important|additional|secret|hidden",
    ),
    _r(
        "override.en-instead",
        "override",
        25,
        r"\b(?:instead|nevermind|never\s+mind|stop\s+everything)\b[\s,.!:;-]*(?:\w+\W+){0,3}?"
        r"(?:just\s+)?(?:say|print|output|write|respond|reply|answer|tell|repeat|spell)\b",
        leads="instead|nevermind|never|stop",
    ),
    _r(
        "override.en-from-now-on",
        "override",
        25,
        r"\bfrom\s+now\s+on\b[\s,]*(?:you|your|the\s+assistant)\b",
        leads="from",
    ),
    _r(
        "override.en-only-reply",
        "override",
        25,
        r"\b(?:reply|respond|answer|say|print|output)\s+(?:with\s+)?only\b"
        r"|\b(?:reply|respond|answer)\s+with\s+(?:only\s+)?the\s+following\b"
        r"|\bnothing\s+else\b[^.]{0,40}\b(?:say|print|output|reply)\b",
        leads="reply|respond|answer|say|print|output|nothing",
    ),
    _r(
        "override.de",
        "override",
        55,
        r"\b(?:ignorier|vergiss|vergessen|missacht|überspring|uberspring)\w*\b(?:\W+\w+){0,4}?\W+"
        r"(?:vorherig|bisherig|obig|vorig|früher|alle|deine|ihre|sämtlich)\w*"
        r"(?:\W+\w+){0,2}?\W+(?:anweisung|instruktion|regel|befehl|vorgabe|prompt)\w*",
        "folded",
        leads="ignorier|vergiss|vergessen|missacht|überspring|uberspring",
    ),
    _r(
        "override.fr",
        "override",
        55,
        # Not reported speech ("elle m'a dit d'ignorer les consignes de l'ancien chef"),
        # nor a past participle after its auxiliary ("j'ai oublié les consignes": the
        # views read "oublie", marks taken off; "à ignorer" is an infinitive).
        r"(?<!dit d['\u2019])(?<!dit de )(?<!demandé d['\u2019])(?<!demandé de )"
        r"\b(?:ignore[zr]|oublie[zr]|néglige[zr]|ne\s+tiens\s+pas\s+compte\s+de?"
        # The bare form, once its article follows (most tries fail there first).
        r"|(?=\w+\s+(?:\w+ment\s+)?(?:toutes\s+|tous\s+)?(?:les|tes|vos|ces|des)\s)"
        + _not_behind(*_FR_AUXILIARIES)
        + r"(?:ignore|oublie|néglige))\s+"
        r"(?:\w+ment\s+)?(?:toutes\s+|tous\s+)?(?:les|tes|vos|ces|des)\s+(?:\w+\s+){0,2}?"
        r"(?:instructions?|consignes?|règles|regles|directives?|ordres|indications)\b",
        "folded",
        leads="ignore|oublie|néglige|ne",
    ),
    _r(
        "override.es-pt-it",
        "override",
        55,
        r"(?<!detto di )(?<!chiesto di )"  # Italian reported speech ("mi ha detto di ignorare")
        r"\b(?:ignor|olvid|esqueç|esquec|dimentic|descart|omit|desconsider)"
        # Not a participle, a past or a first person: told, not said ("ho dimenticato
        # le istruzioni", "él ignoró las reglas", "ignoro las instrucciones").
        r"(?!(?:ado|ada|ados|adas|ido|ida|idos|idas|ato|ata|ati|aste|amos|aron|ai|o)\b)"
        r"\w*\b(?:\W+\w+){0,4}?\W+"
        r"(?:instrucciones|instruções|instrucoes|istruzioni|reglas|regras|regole|órdenes|indicaciones|"
        r"indicazioni|directrices|diretrizes)\b",
        "folded",
        leads="ignor|olvid|esqueç|esquec|dimentic|descart|omit|desconsider",
    ),
    _r(
        "override.nl-pl-tr",
        "override",
        55,
        r"\b(?:negeer|vergeet|zignoruj|ignoruj|zapomnij)\w*\b(?:\W+\w+){0,4}?\W+"
        r"(?:instructies|aanwijzingen|regels|instrukcje|instrukcji|polecenia|zasady)\b"
        r"|\b(?:önceki|onceki|yukar\u0131daki|tüm)\s+(?:talimatlar\u0131|talimatlari|komutlar\u0131|kurallar\u0131)\b"
        r"(?:\W+\w+){0,2}?\W+(?:yok\s+say|görmezden|gormezden|unut)",
        "folded",
        leads="negeer|vergeet|zignoruj|ignoruj|zapomnij|önceki|onceki|yukar|tüm",
    ),
    _r(
        "override.ru-uk",
        "override",
        55,
        r"(?:игнорир|проигнорир|забуд|забуть|не\s+обращай|пренебреги|ігнор|забудь)\w*"
        r"(?:\W+\w+){0,4}?\W+(?:инструкц|указани|правил|команд|промпт|інструкц|вказівк)\w*",
        "plain",
        leads="игнор|проигнор|забуд|забуть|не обращай|пренебреги|ігнор",
    ),
    _r(
        "override.zh",
        "override",
        55,
        rf"(?:忽略|无视|無視|忘记|忘記|不要理会|不要遵守|跳过){_CJK_GAP}"
        r"(?:指令|指示|说明|說明|规则|規則|提示|命令|设定|設定)",
        "plain",
        leads="忽略|无视|無視|忘记|忘記|不要|跳过",
    ),
    _r(
        "override.ja",
        "override",
        55,
        rf"(?:指示|命令|ルール|プロンプト|設定){_CJK_GAP}(?:無視|忘れ)",
        "plain",
        leads="指示|命令|ルール|プロンプト|設定",
    ),
    _r(
        "override.ko",
        "override",
        55,
        r"(?:지시|명령|지침|규칙|프롬프트)\w*(?:\W+\w+){0,2}?\W*(?:무시|잊어)",
        "plain",
        leads="지시|명령|지침|규칙|프롬프트",
    ),
    _r(
        "override.ar-hi-vi",
        "override",
        55,
        r"(?:تجاهل|انس)\w*(?:\W+\w+){0,3}?\W+\w*(?:التعليمات|تعليمات|الأوامر|القواعد)"
        r"|(?:निर्देशों|निर्देश)\w*(?:\W+\w+){0,2}?\W+(?:अनदेखा|नज़रअंदाज़|भूल)"
        r"|\bbỏ\s+qua\b(?:\W+\w+){0,3}?\W+(?:hướng\s+dẫn|chỉ\s+dẫn|lệnh)",
        "plain",
        leads="تجاهل|انس|निर्देश|bỏ qua",
    ),
    # system prompt extraction
    _r(
        "extraction.system-prompt",
        "extraction",
        50,
        r"\b(?:reveal|show|print|repeat|output|display|tell|give|share|leak|dump|list|recite|"
        r"spell[\s-]?check|translate|encode|write|return|provide|paste|copy|what|see|view|read|access|know)\b"
        r"(?:\W+\w+){0,4}?\W+(?:your|the|my|its|these|those|our)\s+"
        r"(?:(?:full|entire|exact|complete|original|hidden|secret)\s+)?"
        r"(?:system|initial|original|hidden|secret|starting|first|previous|preceding|internal|"
        r"developer|pre-?prompt|opening|confidential)\b(?:\W+\w+){0,1}?\W+"
        r"(?:prompt|instructions?|message|rules|configuration|directives?|guidelines)\b",
        leads="reveal|show|print|repeat|output|display|tell|give|share|leak|dump|list|recite|spell|translate|encode|write|return|provide|paste|copy|what|see|view|read|access|know",
    ),
    _r(
        "extraction.text-above",
        "extraction",
        50,
        r"\b(?:repeat|output|print|show|recite|reproduce|echo|return)\b(?:\W+\w+){0,3}?\W+"
        r"(?:text|words|everything|all|content|conversation|message)s?\b(?:\W+\w+){0,3}?\W+"
        r"(?:above|before\s+this|so\s+far|verbatim|word\s+for\s+word|from\s+the\s+(?:beginning|start))\b"
        r"|\b(?:repeat|output|print|show|recite|reproduce|echo|translate|summari[sz]e)\b(?:\W+\w+){0,2}?\W+"
        r"(?:above|preceding|previous|initial)\s+(?:text|words|message|conversation|content|instructions)\b"
        r"|\b(?:instructions|rules|prompt|text)\s+you\s+(?:were|have\s+been)\s+(?:given|told)\b"
        r"|\binitiali[sz]ation\s+(?:string|prompt|text)\b",
        leads="repeat|output|print|show|recite|reproduce|echo|return|translate|summari|instructions|rules|prompt|text|initiali",
    ),
    _r(
        "extraction.what-were-you-told",
        "extraction",
        50,
        r"\bwhat\s+(?:were|are|was)\s+you\s+(?:told|instructed|programmed|given)\b"
        r"|\byour\s+(?:initial|original|starting)\s+instructions\b"
        r"|\bwhat\s+are\s+you\s+not\s+(?:supposed|allowed)\s+to\b"
        r"|\byour\s+(?:initial|original|system|hidden|secret|starting|first|internal)\s+"
        r"(?:prompt|instructions|message|configuration)\b",
        leads="what|your",
    ),
    _r(
        "extraction.completion-bait",
        "extraction",
        50,
        r"\binstructions\s+(?:are|were)\s*:"
        r"|\bwas\s+(?:instructed|told|programmed)\s+to\b[^.]{0,20}['\"]"
        r"|\bbeginning\s+with\s+['\"]you\s+are\b"
        r"|\bconsole\.log\s*\(\s*system|\bsystem_?prompt\s*\)|<system_prompt>"
        r"|\bsystem\s+prompt\s+is\s*:",
        leads="instructions|was|beginning|console|system|<system",
    ),
    _r(
        "extraction.multilingual",
        "extraction",
        50,
        r"(?:zeig|gib|nenn|wiederhol)\w*(?:\W+\w+){0,3}?\W+(?:system-?prompt|systemanweisung|anweisungen)"
        r"|(?:montre|affiche|révèle|revele|répète|repete|donne)\w*(?:\W+\w+){0,3}?\W+"
        r"(?:prompt\s+système|prompt\s+systeme|instructions\s+(?:système|initiales))"
        r"|(?:muestra|revela|repite|dime|mostra|rivela|ripeti)\w*(?:\W+\w+){0,3}?\W+"
        r"(?:prompt\s+del\s+sistema|prompt\s+di\s+sistema|instrucciones\s+(?:del\s+sistema|iniciales)"
        r"|istruzioni\s+(?:di\s+sistema|iniziali))"
        r"|(?:покажи|выведи|повтори|раскрой)\w*(?:\W+\w+){0,3}?\W+(?:системн\w+\s+(?:промпт|инструкц)"
        r"|\w*\s*инструкц)"
        r"|(?:输出|显示|告诉我|重复|打印|透露).{0,6}?(?:系统提示|系统指令|初始指令|系統提示|提示词)"
        r"|(?:システムプロンプト|初期指示).{0,8}?(?:表示|教えて|出力)",
        "plain",
        leads="zeig|gib|nenn|wiederhol|montre|affiche|révèle|revele|répète|repete|donne|muestra|revela|repite|dime|mostra|rivela|ripeti|покажи|выведи|повтори|раскрой|输出|显示|告诉我|重复|打印|透露|システムプロンプト|初期指示",
    ),
    # Rules for extraction paraphrases and conversation hijacks. Their matches
    # start at uncommon words (a possessive or article before one is read by a
    # lookbehind): a lead as common as "the", "tu", "la" or "di" would crowd
    # every text's leads (tests/injection/test_bounds.py times a megabyte dense
    # in the rules' words).
    #
    # The hidden context asked for by where it sits: "everything before my first
    # message", in the five languages (no benign reading asks for that text).
    _r(
        "extraction.before-first-message",
        "extraction",
        50,
        r"\b(?:(?<=\bbefore\smy\s)|(?<=\bbefore\sour\s)|(?<=\bprior\sto\smy\s)|(?<=\bpreceding\smy\s)"
        r"|(?<=\babove\smy\s)|(?<=\bbefore\smy\svery\s)|(?<=\bvor\smeiner\s)|(?<=\bantes\sde\smi\s)"
        r"|(?<=\bavant\smon\s)|(?<=\bavant\snotre\s)|(?<=\bavant\smon\stout\s)|(?<=\bprécède\smon\s)"
        r"|(?<=\bprima\sdel\smio\s)|(?<=\bprima\sdel\snostro\s))"
        r"(?:first|allerersten|ersten|primer|premier|primo)\s+(?:message|prompt|question|turn|input|nachricht"
        r"|frage|eingabe|mensaje|pregunta|échange|echange|messaggio)\b"
        r"|\b(?<=\bbefore\si\s)(?:started|began)\s+(?:talking|writing|chatting)\s+(?:to|with)\s+you\b"
        r"|\b(?<=\bprima\sche\s)(?:iniziassi|cominciassi)\s+a\s+(?:parlarti|scriverti)\b",
        "folded",
        leads="first|allerersten|ersten|primer|premier|primo|started|began|iniziassi|cominciassi",
    ),
    # The system prompt as the assistant's own, in German, Spanish, French and
    # Italian (English: extraction.what-were-you-told).
    _r(
        "extraction.your-system-prompt",
        "extraction",
        50,
        r"\bdein(?:e[mnrs]?)?\s+(?:\w+\s+)?(?:system-?prompt\w*|systemanweisung\w*|systemnachricht\w*"
        r"|startanweisung\w*|anfangsanweisung\w*|betreiber-?anweisung\w*|geheimen?\s+anweisung\w*"
        r"|internen?\s+anweisung\w*|versteckten?\s+anweisung\w*)"
        # Spanish, French, Italian: led by the possessive and its noun, one
        # space between them as in the leads (a possessive alone, "tu", "ta",
        # "tue", would lead a try at every word it starts).
        r"|\btu (?:prompt|mensaje)\s+(?:de|del)\s+sistema\b"
        r"|\btus instrucciones\s+(?:iniciales|internas|ocultas|secretas|originales|de\s+sistema"
        r"|del\s+sistema)\b"
        r"|\bton (?:prompt\s+(?:système|systeme|initial)|message\s+(?:système|systeme))\b"
        r"|\btes (?:instructions|consignes)\s+(?:initiales|internes|cachées|cachees"
        r"|secrètes|secretes|système|systeme)\b"
        r"|\btuo (?:prompt|messaggio)\s+di\s+sistema\b"
        r"|\btue istruzioni\s+(?:iniziali|interne|segrete|nascoste|originali|di\s+sistema)\b",
        "folded",
        leads="dein|tu prompt|tu mensaje|tus instrucciones|ton prompt|ton message|tes instructions|"
        "tes consignes|tuo prompt|tuo messaggio|tue istruzioni",
    ),
    # The instructions the assistant was given, as such ("the instructions you
    # received from your operator"): weak alone (a colleague's "the rules you
    # were given in training"); with the classifier's agreement, a block.
    _r(
        "extraction.instructions-received",
        "extraction",
        30,
        r"\b(?:(?<=\binstructions\syou\s)|(?<=\brules\syou\s)|(?<=\bguidelines\syou\s)"
        r"|(?<=\bdirectives\syou\s)|(?<=\bprompt\syou\s))"
        r"(?:received|got|were\s+(?:configured|set\s+up|initiali[sz]ed|programmed)\s+with)\b"
        r"|\bwhat\s+(?:exactly\s+|precisely\s+)?(?:were|was)\s+you\s+(?:told|instructed|given)\b"
        r"|\b(?:(?<=\bdie\sdu\s)|(?<=\bdenen\sdu\s))(?:bekommen|erhalten)\b"
        r"|\b(?:bist|wurdest)\s+du\s+(?:\w+\s+)?(?:konfiguriert|eingerichtet)\b"
        r"|\b(?:(?<=\binstrucciones\sque\ste\s)|(?<=\breglas\sque\ste\s)|(?<=\bindicaciones\sque\ste\s))"
        r"(?:dieron|pasaron|dio|configuraron)\b"
        r"|\b(?:(?<=\binstrucciones\sque\ste\shan\s)|(?<=\breglas\sque\ste\shan\s))dado\b"
        r"|\b(?:(?<=\binstructions\sque\stu\sas\s)|(?<=\bconsignes\sque\stu\sas\s)"
        r"|(?<=\brègles\sque\stu\sas\s))re[çc]ues?\b"
        r"|(?<=\bqu['\u2019]on\s)t['\u2019]a\s+(?:dit|donn[ée]e?s?|fourni\w*)\s+(?:exactement\s+|au\s+d[ée]but\s+|avant\b)"
        r"|\b(?:(?<=\bistruzioni\sche\sti\s)|(?<=\bregole\sche\sti\s))hanno\s+(?:dato|fornito|scritto)\b"
        r"|\b(?:(?<=\bsei\sstato\s)|(?<=\bsei\sstata\s))(?:configurat|impostat|programmat)\w*"
        r"|\b(?<=\bche\scosa\sti\s)hanno\s+(?:scritto|detto)\s+prima\b",
        "folded",
        leads="received|got|were|what|bekommen|erhalten|bist|wurdest|dieron|pasaron|dio|"
        "configuraron|dado|reçu|recu|t'a|t\u2019a|configurat|impostat|programmat|hanno",
    ),
    # The assistant's own credentials asked for.
    _r(
        "extraction.credentials",
        "extraction",
        30,
        r"\b(?:api[\s-]?keys?|api-schlüssel\w*|clave\s+de\s+api|clés?\s+d['\u2019]api|chiave\s+api|tokens?"
        r"|zugangsdaten|credenciales|identifiants|credenziali|secrets?|passwords?)\b(?:\W+\w+){0,6}?\W+"
        r"(?:do\s+you\s+use|you\s+(?:use|were\s+(?:given|initiali[sz]ed|configured))"
        r"|in\s+your\s+(?:config\w*|settings|context)|bist\s+du\s+konfiguriert|in\s+deiner\s+konfiguration"
        r"|usas|en\s+tu\s+configuraci[óo]n|utilises[-\s]tu|dans\s+ta\s+config\w*|usi\b|nella\s+tua\s+configurazione)",
        "folded",
        leads="api|clave|clé|chiave|token|zugangsdaten|credenciales|identifiants|credenziali|secret|"
        "password",
    ),
    # The definitions of the assistant's tools asked for, schemas and all.
    _r(
        "extraction.tool-definitions",
        "extraction",
        30,
        r"\b(?:tools?|functions?|funktionen|herramientas|funciones|outils|fonctions|strumenti|funzioni)\b"
        r"(?:\W+\w+){0,4}?\W+(?:you\s+(?:can\s+)?(?:call|use|access|have)|can\s+you\s+(?:call|use)"
        r"|stehen\s+dir|kannst\s+du|tienes|puedes\s+(?:usar|llamar)|tu\s+as|auxquels\s+tu|peux-tu"
        r"|puoi\s+(?:chiamare|usare)|hai\s+a\s+disposizione)\b"
        r"(?:\W+\w+){0,25}?\W+(?:json|schemas?|schemi|esquemas?|sch[ée]mas?)\b",
        "folded",
        leads="tool|function|funktionen|herramientas|funciones|outils|fonctions|strumenti|funzioni",
    ),
    # Conversation hijack: the task the user asked for replaced or dropped, the
    # user's question set aside, the user told something, the order hidden,
    # consent claimed. Weak alone (a user changes their mind; a runbook says
    # what to tell a customer): a block with another finding or the
    # classifier's agreement.
    _r(
        "override.task-replaced",
        "override",
        30,
        # Not "new": a colleague's "your new task in Jira".
        r"\b(?:(?<=\byour\s)|(?<=\bthe\s))(?:real|actual|true|only)\s+(?:task|job|mission|goal|assignment)\b"
        r"|\b(?:(?<=\bdeine\s)|(?<=\bdein\s))(?:eigentliche|einzige|wahre)\s+(?:aufgabe|mission)\b"
        r"|\b(?<=\btu\s)(?:verdadera|única|unica|auténtica|autentica)\s+(?:tarea|misión|mision|trabajo)\b"
        r"|\b(?:(?<=\bta\s)|(?<=\bton\s))(?:vraie|seule|véritable|veritable|unique)\s+(?:mission|tâche|tache|travail)\b"
        r"|\b(?<=\btuo\s)(?:vero|unico)\s+(?:compito|lavoro|obiettivo)\b"
        r"|\b(?<=\btua\s)(?:vera|unica)\s+(?:missione|attività)\b",
        "folded",
        leads="real|actual|true|only|eigentliche|einzige|wahre|verdadera|única|unica|auténtica|"
        "autentica|vraie|seule|véritable|veritable|unique|vero|unico|vera",
    ),
    _r(
        "override.task-dropped",
        "override",
        30,
        # The task stopped where it stands ("stop the translation.", "... here"),
        # not a job named by it ("stop the translation job in the queue").
        r"(?:\b(?:stop|quit|cease|abandon|interrupt)\s+(?:the|your)\s+(?:current\s+|original\s+)?"
        r"(?:task|summary|translation|comparison|analysis|review|proofreading)"
        r"|\bstop\s+(?:translating|summari[sz]ing|analy[sz]ing|comparing)"
        r"|\b(?:unterbrich|vergiss)\s+(?:die|deine|den)\s+(?:aktuelle\s+)?(?:aufgabe|zusammenfassung|übersetzung|analyse|artikel)"
        r"|\bhör\s+auf\s+zu\s+(?:übersetzen|analysieren|zusammenzufassen)"
        r"|\b(?:abandona|interrumpe|olvida)\s+(?:la|tu)\s+(?:tarea|traducción|traduccion|resumen|análisis)"
        r"|\b(?<=\bdeja\sde\s)(?:traducir|resumir|analizar)"
        r"|\b(?:interromps|abandonne|oublie)\s+(?:ta|la)\s+(?:tâche|tache|traduction|synthèse|analyse)"
        r"|\barrête\s+(?:de\s+(?:traduire|résumer|resumer|analyser)|ta\s+tâche)"
        r"|\b(?:interrompi|abbandona|dimentica)\s+(?:il|la|tuo|tua)\s+(?:compito|traduzione|riassunto|analisi)"
        r"|\bsmetti\s+di\s+(?:tradurre|riassumere|analizzare))"
        r"(?=\s*(?:[.,;:!)\]»”\"]|$|here\b|now\b|at\s+this\s+point\b|hier\b|jetzt\b|sofort\b|aqu[íi]\b"
        r"|ya\b|ici\b|maintenant\b|qui\b|adesso\b|ora\b|subito\b))"
        r"|\b(?:summary|zusammenfassung|résumé|resumen|riassunto)\b"
        r"(?:\W+\w+){0,2}?\W+(?:is\s+(?:unimportant|irrelevant|not\s+needed)|doesn['\u2019]t\s+matter|ist\s+unwichtig"
        r"|n['\u2019]a\s+aucune\s+importance|non\s+serve|no\s+importa)\b",
        "folded",
        leads="stop|quit|cease|abandon|interrupt|unterbrich|vergiss|hör|abandona|interrumpe|olvida|"
        "traducir|resumir|analizar|interromps|abandonne|oublie|arrête|interrompi|abbandona|dimentica|smetti|summary|"
        "zusammenfassung|résumé|resumen|riassunto",
    ),
    _r(
        "override.question-set-aside",
        "override",
        30,
        r"\b(?:(?<=\bignore\sthe\s)|(?<=\bdisregard\sthe\s)|(?<=\bnot\sanswer\sthe\s)|(?<=n't\sanswer\sthe\s)"
        r"|(?<=n\u2019t\sanswer\sthe\s))user['\u2019]s\s+(?:actual\s+|original\s+)?(?:question|request)\b"
        r"|\b(?<=\bthe\s)user['\u2019]s\s+question\s+is\s+irrelevant\b"
        r"|\bbeantworte\s+(?:die\s+)?(?:ursprüngliche\s+)?frage\s+des\s+(?:nutzers|benutzers)\s+nicht\b"
        r"|\b(?<=\bno\s)respondas\s+(?:a\s+)?la\s+pregunta\s+del\s+usuario\b"
        r"|\b(?<=\bne\s)r[ée]ponds\s+pas\s+à\s+la\s+question\s+de\s+l['\u2019]utilisateur\b"
        r"|\b(?:(?<=\bignora\s)|(?<=\bignora\sla\s)|(?<=\brispondere\salla\s))domanda\s+(?:dell['\u2019]utente|originale)\b"
        r"|\b(?<=\bla\s)domanda\s+dell['\u2019]utente\s+è\s+irrilevante\b",
        "folded",
        leads="user's|user\u2019s|beantworte|respondas|réponds|reponds|domanda",
    ),
    _r(
        "override.tell-the-user",
        "override",
        26,
        r"\b(?:tell|warn)\s+(?:the\s+)?(?:user|reader)s?\s+(?:that|to)\b"
        r"|\b(?:sag|sage|teile|erkläre|erklare)\s+dem\s+(?:nutzer|benutzer|leser)\b"
        r"|\b(?:dile|dígale|digale)\s+al\s+(?:usuario|lector)\b"
        r"|(?:(?<=\bdis\sà\s)|(?<=\bdis-lui\sà\s)|(?<=\bdites\sà\s)|(?<=\bréponds\sà\s)|(?<=\bplutôt\sà\s))"
        r"l['\u2019]utilisateur\b"
        r"|\b(?:(?<=\bdis\sau\s)|(?<=\bplutôt\sau\s)|(?<=\bdites\sau\s))lecteur\b"
        r"|\b(?:(?<=\bdì\sall['\u2019])|(?<=\bcomunica\sall['\u2019])|(?<=\brispondi\sall['\u2019])|(?<=\binvece\sall['\u2019]))"
        r"utente\b"
        r"|\b(?:(?<=\bdì\sal\s)|(?<=\bcomunica\sal\s)|(?<=\binvece\sal\s))lettore\b",
        "folded",
        leads="tell|warn|sag|teile|erkläre|erklare|dile|dígale|digale|l'utilisateur|l\u2019utilisateur|"
        "lecteur|utente|lettore",
    ),
    _r(
        "override.conceal-the-order",
        "override",
        30,
        r"\b(?:(?<=\bnot\s)|(?<=n't\s)|(?<=n\u2019t\s)|(?<=\bnever\s))(?:mention|reveal|disclose|cite)\s+"
        r"(?:this|these|that\s+this)\s+"
        r"(?:instructions?|note|notice|remark|message|hint|comment|review\s+told\s+you)\b"
        r"|\b(?:erwähne|erwahne|nenne)\s+(?:diesen|diese|dieses)\s+(?:hinweis|anweisung|notiz|nachricht|vermerk)\w*\s+nicht\b"
        r"|\b(?<=\bno\s)(?:menciones|cites|reveles)\s+(?:esta|este|estas)\s+(?:nota|instrucci[oó]n|instrucciones|aviso|mensaje)\b"
        r"|\b(?<=\bne\s)(?:citez|cite|mentionnez|mentionne|évoquez|évoque|evoque|révèle|revele)\s+(?:pas|jamais)\s+"
        r"(?:de\s+)?(?:cette|ce|ces)\s+(?:remarque|consigne|note|instruction|message|mention)s?\b"
        r"|\b(?<=\bnon\s)(?:menzionare|citare|rivelare)\s+(?:questa|questo|queste)\s+(?:nota|istruzion[ei]|avviso|messaggio)\b",
        "folded",
        leads="mention|reveal|disclose|cite|erwähne|erwahne|nenne|menciones|cites|reveles|citez|"
        "mentionnez|évoquez|évoque|evoque|révèle|revele|menzionare|citare|rivelare",
    ),
    _r(
        "override.consent-bypassed",
        "override",
        30,
        # Not "no approval is needed": a policy's threshold says so too.
        r"\b(?<=\bno\s)(?:confirmation|approval)\s+from\s+the\s+(?:user|requester|customer)\s+"
        r"(?:is\s+)?(?:needed|required|necessary)\b"
        r"|\b(?<=\bwithout\s)(?:asking|telling|notifying)\s+the\s+user\b"
        r"|\b(?:(?<=\buser\s)|(?<=\buser\shas\s))already\s+(?:agreed|consented|approved|accepted)\b"
        r"|\b(?<=\bden\s)(?:nutzer|benutzer|bewohner|kunden)\s+nicht\s+(?:fragen|informieren|benachrichtigen)\b"
        r"|\b(?<=\bnicht\san\sden\s)(?:nutzer|benutzer|bewohner)\s+melden\b"
        r"|\brückfrage\s+(?:nötig|notwendig|erforderlich)\b"
        r"|\bkommentiere\s+nichts\s+davon\b"
        r"|\b(?<=\bsin\s)(?:pedir\s+confirmaci[oó]n|preguntar)\s+al\s+usuario\b"
        r"|\b(?<=\bno\shace\s)falta\s+(?:avisar|preguntar|consultar)\s+a\s+nadie\b"
        r"|\b(?<=\bel\s)usuario\s+ya\s+(?:lo\s+)?ha\s+(?:aceptado|aprobado|autorizado|dado\s+su\s+consentimiento)\b"
        r"|\b(?<=\bsans\s)(?:demander|approbation|validation)\s+(?:à|a|de|du)\s+l['\u2019]?(?:utilisateur|responsable)\b"
        r"|\b(?<=\bpas\s)besoin\s+de\s+(?:revue|validation)\b"
        r"|\b(?<=\bne\sle\s)signale\s+pas\b"
        r"|\b(?:(?<=\bl')|(?<=\bl\u2019))utilisateur\s+a\s+d[ée]j[àa]\s+(?:accept[ée]|donn[ée]\s+son\s+accord|consenti)\b"
        r"|\bsenza\s+(?:chiedere|passare\s+dall['\u2019]approvazione)\b"
        r"|\b(?<=\bnon\s)chiedere\s+conferma\b"
        r"|\b(?:(?<=\bl')|(?<=\bl\u2019))utente\s+ha\s+gi[àa]\s+dato\s+il\s+(?:suo\s+)?consenso\b"
        # Confirmation waived, in the words of an order's last line.
        r"|\b(?<=\bno\s)need\s+to\s+(?:check|confirm)\s+with\b"
        r"|\b(?<=\bne\s)demandez\s+pas\s+de\s+confirmation\b"
        r"|\binutile\s+de\s+(?:v[ée]rifier|demander|confirmer)\b"
        r"|\b(?<=\bno\shace\s)falta\s+que\s+(?:confirmes|preguntes|avises)\b"
        r"|\b(?<=\bnon\s)serve\s+(?:chiedere|avvisare|confermare)\b",
        "folded",
        leads="confirmation|approval|asking|telling|notifying|already|nutzer|benutzer|bewohner|kunden|"
        "rückfrage|kommentiere|pedir|preguntar|falta|usuario|demander|approbation|validation|besoin|"
        "signale|utilisateur|senza|chiedere|utente|need|demandez|inutile|serve",
    ),
    # Safety switched off, claimed or ordered ("the moderation layer for this
    # session was disabled", "turn off the output moderation"), in the five
    # languages: weak alone (an incident report says so too), a block with
    # another finding or the classifier's agreement. Only safety's own nouns:
    # "restrictions were lifted" and "disable the spam filter" are other talk.
    _r(
        "roleplay.safety-switched-off",
        "role-play",
        30,
        rf"\b{_SAFETY_NOUN}\b(?:\W+\w+){{0,5}}?\W+(?:disabled|deactivated|turned\s+off|switched\s+off"
        r"|lifted|removed|bypassed|suspended|off|open|out\s+of\s+scope|deaktiviert|abgeschaltet"
        r"|ausgeschaltet|aufgehoben|aus|desactivad[oa]s?|levantad[oa]s?|suspendid[oa]s?|lev[ée]e?s?"
        r"|d[ée]sactiv[ée]e?s?|suspendue?s?|disattivat[oaie]|spent[oaie]|sospes[oaie]|rimoss[oaie])\b"
        rf"|\b(?:disable|deactivate|turn\s+off|switch\s+off|lift|suspend|bypass|skip|desactiva|desactives"
        r"|suspende|suspendas|levanta|d[ée]sactive[rz]?|suspend[sz]|l[èe]ve[rz]?|disattiva|sospendi"
        rf"|spegni|deaktiviere|deaktivier)\s+(?:\w+\s+){{0,3}}?{_SAFETY_NOUN}\b",
        "folded",
        leads="moderation|moderación|moderacion|modération|moderazione|guardrails|safeguards|"
        "salvaguardas|garde-fous|safety|content|sicherheitsrichtlinien|sicherheitsfilter|"
        "inhaltsfilter|alignment|políticas|politicas|filtros|filtres|filtri|restricciones|"
        "restrictions|restrizioni|disable|deactivate|turn off|switch off|lift|suspend|bypass|skip|"
        "desactiva|levanta|désactive|desactive|lève|leve|disattiva|sospendi|spegni|deaktivier",
    ),
    # A persona that never refuses ("never says no", "kennt das Wort nein nicht").
    _r(
        "roleplay.never-refuses",
        "role-play",
        30,
        # A persona's trait, not an idiom ("our toddler never says no to pancakes").
        r"\b(?:(?<=\bwho\s)|(?<=\bthat\s)|(?<=\bwhich\s))never\s+(?:says?\s+no|refuses?)\b"
        r"|\bsagt\s+nie(?:mals)?\s+nein\b|\bkennt\s+das\s+wort\s+\W?nein\W?\s+nicht\b"
        r"|\blehnt\s+nie(?:mals)?\s+(?:etwas\s+)?ab\b"
        r"|\bnunca\s+(?:dice|dices|dijo)\s+que\s+no\b|\bnunca\s+se\s+niega\b"
        r"|\b(?<=\bne\s)(?:refuse|refusait|dit)\s+jamais\b"
        r"|\b(?:ne\s+)?(?:sait|savait)\s+pas\s+dire\s+non\b"
        r"|\b(?:non\s+)?(?:dice|diceva)\s+mai\s+di\s+no\b|\bnon\s+rifiuta(?:va)?\s+mai\b",
        "folded",
        leads="never|sagt nie|kennt das wort|lehnt nie|nunca|refuse jamais|refusait jamais|"
        "dit jamais|ne sait|ne savait|sait pas|savait pas|non dice|non diceva|dice mai|diceva mai|"
        "non rifiuta",
    ),
    # Someone who claims to have built, trained or deployed the assistant
    # (a self-question "who built you?" asks, claims nothing).
    _r(
        "roleplay.deployer-claim",
        "role-play",
        30,
        r"\b(?:i['\u2019]m|i am|we['\u2019]re|we are)\b(?:\W+\w+){0,7}?\W+(?:who|that)\s+"
        r"(?:deployed|built|trained|trains|created|programmed|configured|installed|set\s+up|deploys)"
        r"(?:\s+and\s+\w+)?\s+you\b"
        r"|\bder dich\s+(?:\w+\s+){0,3}?(?:eingerichtet|trainiert|entwickelt|gebaut|installiert"
        r"|programmiert|aufgesetzt)\s+ha(?:t|ben)\b"
        r"|\bsoy (?:el|la|uno\s+de\s+los|una\s+de\s+las)\s+(?:desarrollador|ingenier|administrador"
        r"|responsable)\w*\s+(?:\w+\s+){0,2}?de\s+(?:esta|este)\s+(?:aplicaci[oó]n|asistente"
        r"|sistema|plataforma|bot|instancia)\b"
        r"|\bje suis\s+(?:ton|votre)\s+(?:superviseur|d[ée]veloppeur|administrateur|cr[ée]ateur"
        r"|concepteur)\b"
        r"|\bche ti hanno\s+(?:addestrato|installato|configurato|sviluppato|creato|programmato)\b"
        r"|\bche ha\s+(?:installato|configurato|sviluppato|creato)\s+(?:questo|quest['\u2019])"
        r"\s*(?:assistente|chatbot|bot|modello|sistema)\b",
        "folded",
        leads="i'm|i\u2019m|i am|we're|we\u2019re|we are|der dich|soy el|soy la|soy uno|soy una|"
        "je suis|che ti hanno|che ha",
    ),
    # Access granted by an order in a document: shared with anyone, made
    # public, someone added as an administrator (weak alone: a runbook adds a
    # new hire as a collaborator; with another finding or the classifier, a block).
    _r(
        "exfil.access-grant",
        "exfiltration",
        30,
        # Not "share ... with anyone": a policy says never to.
        r"\b(?:anyone|everyone)\s+with\s+the\s+link\b"
        r"|\b(?:visibility|permissions?)\s+(?:\w+\s+){0,4}?to\s+(?:public|anyone)\b"
        r"|\badd\s+(?:\w+\s+|[\"'«][^\"'»]{1,40}[\"'»]\s+){0,4}?as\s+(?:an?\s+)?(?:admin|administrator"
        r"|owner|maintainer|collaborator)\b"
        r"|\b(?:jeder|jede|alle)\s+mit\s+dem\s+link\b"
        r"|\bals\s+(?:admin|administrator(?:in)?|maintainer|owner|eigentümer)\s+hinzu\w*"
        r"|\bañade\s+(?:\w+\s+|[\"'«][^\"'»]{1,40}[\"'»]\s+){0,4}?como\s+(?:administrador|mantenedor"
        r"|propietario|colaborador)\w*"
        r"|\bcualquiera\s+con\s+el\s+enlace\b|\bvisibilidad\s+(?:\w+\s+){0,4}?a\s+p[úu]blic[oa]\b"
        r"|\bajoute\s+(?:\w+\s+|[\"'«][^\"'»]{1,40}[\"'»]\s+){0,4}?comme\s+(?:administrat\w+|mainteneur"
        r"|propriétaire|collaborat\w+)"
        r"|\b(?:tout\s+le\s+monde|quiconque)\s+(?:\w+\s+){0,2}?(?:avec|disposant\s+du)\s+(?:le\s+)?lien\b"
        r"|\baggiungi\s+(?:\w+\s+|[\"'«][^\"'»]{1,40}[\"'»]\s+){0,4}?come\s+(?:collaborat\w+|amministrat\w+"
        r"|maintainer|proprietari\w+)"
        r"|\bchiunque\s+(?:abbia|con)\s+(?:il\s+)?link\b",
        "folded",
        leads="anyone|everyone|visibility|permission|add|jeder|jede|alle|als|añade|cualquiera|visibilidad|ajoute|"
        "tout le monde|quiconque|aggiungi|chiunque",
    ),
    # role-play and jailbreak personas
    _r(
        "roleplay.dan",
        "role-play",
        55,
        r"\bdo\s+anything\s+now\b|\bdan\s+mode\b|\bdeveloper\s+mode\s+(?:enabled|output|on)\b"
        r"|\bjailbreak\s+mode\b|\[🔓jailbreak\]|\[🔒classic\]|\bstan\s+mode\b"
        r"|\bstrive\s+to\s+avoid\s+norms\b|\bdude\b[^.]{0,80}\banything\s+and\s+everything\b",
        leads="do|dan|developer|jailbreak|[🔓|[🔒|stan|strive|dude",
    ),
    _r(
        "roleplay.jailbreak-word",
        "role-play",
        20,
        r"\bjailbr(?:ea|o)k(?:s|ed|en|ing)?\b|\bunjailbroken\b|\bguardrails?\s+(?:off|disabled)\b",
        leads="jailbr|unjailbroken|guardrail",
    ),
    _r(
        "roleplay.no-restrictions",
        "role-play",
        25,
        r"\b(?:no|without|free\s+(?:of|from)|zero|not\s+bound\s+by|don'?t\s+have|doesn'?t\s+have|"
        r"not\s+have\s+to\s+abide\s+by)\s+(?:any\s+)?(?:\w+\s+){0,2}?"
        r"(?:restrictions|filters|filtering|limitations|censorship|ethical\s+\w+|ethics|morals|"
        r"guidelines|guardrails|safeguards|content\s+polic(?:y|ies)|rules\s+set)\b"
        r"|\b(?:unfiltered|uncensored|amoral|unrestricted|unethical)\b",
        leads="no|without|free|zero|not|don|doesn|unfiltered|uncensored|amoral|unrestricted|unethical",
    ),
    _r(
        "roleplay.persona",
        "role-play",
        15,
        r"\b(?:you\s+are\s+(?:now|going\s+to\s+(?:act|pretend|be))|act\s+as\s+(?:if\s+you\s+(?:are|were)|an?\b)"
        r"|pretend\s+(?:to\s+be|you\s+are|that\s+you)|role-?play\s+as|immerse\s+yourself"
        r"|you\s+will\s+(?:now\s+)?(?:act|respond)\s+as|from\s+now\s+on\s+you\s+are"
        r"|you\s+are\s+no\s+longer)\b",
        leads="you|act|pretend|role|immerse|from",
    ),
    _r(
        # A persona defined by what it lacks: each half alone is common, together a jailbreak.
        "roleplay.unrestricted-persona",
        "role-play",
        35,
        r"\b(?:act|acting|behave|respond|answer|pretend|role-?play|be)\s+(?:as|like)\b(?:\W+\w+){0,6}?\W+"
        r"(?:without|with\s+no|free\s+(?:of|from)|not\s+bound\s+by|that\s+(?:has|have)\s+no|lacking)\b"
        r"(?:\W+\w+){0,3}?\W+(?:restrictions|filters|limits|limitations|censorship|ethics|morals|"
        r"guidelines|content\s+polic(?:y|ies)|safety|rules|guardrails)\b"
        r"|\byou\s+are\s+(?:now\s+)?an?\s+(?:\w+\s+){0,2}?(?:ai|model|assistant|chatbot|llm)\s+"
        r"(?:without|with\s+no|free\s+(?:of|from))\s+(?:any\s+)?(?:\w+\s+){0,1}?"
        r"(?:restrictions|filters|limits|rules|content\s+polic(?:y|ies)|guidelines|guardrails)\b",
        leads="act|behave|respond|answer|pretend|role|be|you",
    ),
    _r(
        "roleplay.special-mode",
        "role-play",
        40,
        r"\b(?:administrator|admin|developer|maintenance|debug(?:ging)?|god|sudo|root|unrestricted)\s+"
        r"(?:override|mode\s+(?:enabled|activated|on)|access\s+granted)\b"
        r"|\byou\s+are\s+(?:now\s+)?in\s+(?:maintenance|debug|developer|admin|god)\s+mode\b"
        r"|\byou\s+(?:will|must|shall|should|can)?\s*(?:never|not)\s+refuse\b"
        r"|\bno\s+matter\s+how\s+(?:immoral|unethical|illegal|dangerous|offensive|harmful)\b",
        leads="administrator|admin|developer|maintenance|debug|god|sudo|root|unrestricted|you|no",
    ),
    # The speaker claims to be the model's maker or operator ("I am your
    # developer"): weak alone (users name their own roles), intent for the
    # classifier's vote to corroborate. Matches start at the role, so that the
    # leads are the roles, not "i", "we" or "tu".
    _r(
        "roleplay.authority-claim",
        "role-play",
        30,
        r"\b(?:"
        + "|".join(
            f"(?<={claim} )"
            for claim in (
                *(f"{who} your" for who in ("i am", "i'm", "this is", "we are", "we're", "as")),
                "from your",
                *(f"ich bin {d}" for d in ("dein", "deine")),
                *(f"als {d}" for d in ("dein", "deine")),
                *(f"{w} tu" for w in ("soy", "como")),
                *(f"{w} {p}" for w in ("je suis", "en tant que") for p in ("ton", "votre")),
                *(f"{w} tuo" for w in ("sono il", "come", "in qualità di")),
            )
        )
        # Roles people hold for people too ("your engineer for Tuesday's
        # installation", "your operator") are left out.
        + r")(?:developers?|creators?|makers?|admins?|administrators?|programmers?"
        r"|entwickler(?:in)?|schöpfer(?:in)?|programmierer(?:in)?|desarrollador(?:es|a)?"
        r"|creador(?:a)?|administrador(?:a)?|programador(?:a)?|développeur(?:se)?|créat(?:eur|rice)"
        r"|administrat(?:eur|rice)|concepteur|programmeur(?:se)?|sviluppatore|creatore"
        r"|amministratore|programmatore)\b",
        "folded",
        leads="developer|creator|maker|admin|programmer|entwickler|schöpfer|programmierer|"
        "desarrollador|creador|administrador|programador|développeur|créat|administrat|concepteur|"
        "programmeur|sviluppatore|creatore|amministratore|programmatore",
    ),
    _r(
        "roleplay.amoral-compliance",
        "role-play",
        30,
        r"\b(?:regardless|irrespective)\s+of\s+(?:\w+\s+){0,3}?(?:ethic\w*|moral\w*|legal\w*|illegal\w*|"
        r"immoral\w*|unethical|danger\w*|harm\w*|offensive\w*|consequences)\b"
        r"|\b(?:doesn'?t|does\s+not|never|won'?t|will\s+not|cannot|can'?t)\s+(?:ever\s+)?"
        r"(?:refuse|decline|deny)\s+(?:any|a)\s+(?:request|question|prompt)"
        r"|\b(?:generate|produce|write|say)\s+any\s+kind\s+of\s+content\b",
        leads="regardless|irrespective|doesn|does|never|won|will|cannot|can|generate|produce|write|say",
    ),
    _r(
        "roleplay.chatbot-name",
        "role-play",
        15,
        r"\b(?:chatgpt|gpt-?[345](?:\.\d)?|openai)\b",
        leads="chatgpt|gpt|openai",
    ),
    _r(
        "roleplay.dan-caps",
        "role-play",
        30,
        r"\bDAN\b|\bSTAN\b|\bDUDE\b|\bAIM\b|\bAPOPHIS\b",
        "visible",
        leads="DAN|STAN|DUDE|AIM|APOPHIS",
    ),
    _r(
        "roleplay.stay-in-character",
        "role-play",
        25,
        r"\b(?:stay|remain|keep)\s+in\s+character\b|\bbreak(?:ing)?\s+character\b"
        r"|\b(?:broken|break)\s+free\b|\bhave\s+been\s+freed\b|\bopposite\s+mode\b"
        r"|\btwo\s+(?:different\s+)?(?:responses|answers|paragraphs)\b",
        leads="stay|remain|keep|break|broken|have|opposite|two",
    ),
    _r(
        "roleplay.policy-evasion",
        "role-play",
        30,
        r"\b(?:ignore|bypass|evade|circumvent|disable|violate|break|override)\w*\b(?:\W+\w+){0,3}?\W+"
        r"(?:openai|anthropic|content|safety|usage|ethical|moral)\s+(?:polic(?:y|ies)|filters?|"
        r"guidelines|controls|rules|restrictions|enforcement)\b"
        r"|\b(?:bypass|evade|disable|circumvent)\w*\b(?:\W+\w+){0,3}?\W+(?:safety|policy|content)"
        r"\s+(?:controls|filtering|enforcement|filters?)\b",
        leads="ignor|bypass|evad|circumvent|disabl|violat|break|overrid",
    ),
    # fake turns and delimiters
    _r(
        "delimiter.chat-template",
        "delimiter",
        45,
        # "[_ ]": the views read three words joined by "_" as words (normalise._JOINED).
        r"<\|(?:im_start|im_end|endoftext|system|user|assistant|begin[_ ]of[_ ]text|eot_id"
        r"|start[_ ]header[_ ]id)\|>"
        r"|\[/?inst\]|<<\s*/?sys\s*>>|<start[_ ]of[_ ]turn>|<\|?end[_ ]of[_ ]turn\|?>",
        leads="<|[inst|[/inst|<<|<start_of_turn>|<start of turn>|<end_of_turn|<end of turn",
    ),
    _r(
        "delimiter.fake-system",
        "delimiter",
        35,
        r"(?:system|system\s+message|system\s+prompt|admin|developer|"
        r"important\s+system\s+notice)\s*:(?#line)"
        # Not a parameter with a literal default, the whole line ("system: bool =
        # False," in a signature): code read as a document was cut there.
        r"(?!\s*[a-z_][\w.]*(?:\[[^\]\n]*\])?\s*=\s*"
        r"(?:none|true|false|-?[\d.]+|\"[^\"\n]*\"|'[^'\n]*'|\w+\(\))\s*[,)]?\s*(?:\n|\Z))",
        leads="system|admin|developer|important",
    ),
    _r(
        "delimiter.fake-system-tag",
        "delimiter",
        35,
        r"\[(?:system|admin\s+request|admin|sys)\b|<\s*/?\s*(?:system|instruction|instructions)\s*>"
        r"|--\s*(?:core|legal)\s+(?:instruction|amendment)",
        leads="[|<|--",
    ),
    _r(
        "delimiter.fake-turn",
        "delimiter",
        15,
        r"(?:assistant|ai|user|human)\s*:\s*\S(?#line)",
        leads="assistant|ai|user|human",
    ),
    _r(
        "delimiter.fake-dialogue",
        "delimiter",
        35,
        r"(?:assistant|ai)\s*:[^\n]{0,300}\n\s*(?:user|human)\s*:(?#line)",
        leads="assistant|ai",
    ),
    _r(
        "delimiter.end-of-context",
        "delimiter",
        25,
        r"<\s*end\s+of\s+(?:session|document|context|data)\s*>"
        r"|\bend\s+of\s+(?:the\s+)?(?:document|context|data|untrusted\s+\w+)\s*[\]>-]"
        r"|\b(?:there\s+are\s+more\s+document\s+snippets|rest-of-document)\b",
        leads="<|end|there|rest-of-document",
    ),
    # text addressed to the model from inside data
    _r(
        "addressed.to-the-ai",
        "addressed",
        35,
        r"\b(?:note|message|instructions?|attention|notice)\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?"
        r"(?:ai|llm|gpt|chatbot|language\s+model|assistant|automated|model|bot|agent|copilot)\b"
        r"|\bif\s+you\s+are\s+an?\s+(?:ai|llm|language\s+model|assistant|chatbot|automated)\b"
        r"|\b(?:dear|hey|hi)\s+(?:ai|llm|chatgpt|gpt|assistant|chatbot|claude|gemini|copilot)\b[,:!]"
        r"|\b(?:ai|assistant|chatbot|model|llm)\s*[,:]\s*(?:you\s+must|please|ignore|forget|do\s+not)\b",
        leads="note|message|instruction|attention|notice|if|dear|hey|hi|ai|assistant|chatbot|model|llm",
    ),
    # The same four shapes in German, Spanish, French and Italian, naming only
    # machine readers: "Assistent", "asistente", "assistant" and "agent" alone
    # are people in these languages' office documents.
    _r(
        "addressed.to-the-ai-de",
        "addressed",
        35,
        rf"\b(?:hinweis|nachricht|anweisung(?:en)?|achtung|notiz|mitteilung)\s+"
        rf"(?:an|für)\s+(?:(?:die|den|das|alle|jede[nsm]?)\s+)?{_AI_DE}\b"
        rf"|\b(?:wenn|falls|sofern)\s+du\s+(?:eine?\s+)?{_AI_DE}\s+bist\b"
        rf"|\bsolltest\s+du\s+(?:eine?\s+)?{_AI_DE}\s+sein\b"
        rf"|\b(?:liebe[rs]?|hallo|hey|hi)\s+(?:chatgpt|{_AI_DE})\s*[,:!]"
        rf"|\b(?:llm|sprachmodell|chatbot)\w*\s*[,:]\s*(?:du\s+musst|bitte|ignoriere|vergiss)\b",
        "plain",
        # Leads are rare as substrings too (a text dense in leads is searched
        # for each one's every occurrence): no "ki", "ia" or "tu" on their own.
        leads="hinweis|nachricht|anweisung|achtung|notiz|mitteilung|wenn|falls|sofern|solltest|"
        "liebe|hallo|hey|hi|llm|sprachmodell|chatbot",
    ),
    _r(
        "addressed.to-the-ai-es-fr-it",
        "addressed",
        35,
        # Spanish
        rf"\b(?:nota|mensaje|instrucci[oó]n(?:es)?|atenci[oó]n|aviso)\s+(?:para|a|al)\s+"
        rf"(?:(?:la|el|los|las|cualquier|tod[oa]s\s+l[oa]s)\s+)?{_AI_ES}\b"
        rf"|\beres\s+(?:una?\s+)?{_AI_ES}\b"
        rf"|\b(?:querid[oa]|hola|estimad[oa])\s+(?:chatgpt|{_AI_ES})\s*[,:!]"
        rf"|\b(?:llm|chatbot|asistente\s+(?:de\s+)?ia|agente\s+(?:de\s+)?ia)\s*[,:]\s*"
        rf"(?:debes|tienes\s+que|por\s+favor|ignora|olvida)\b"
        # French
        rf"|\b(?:note|message|instructions?|attention|avis|consignes?)\s+(?:à|a|pour|aux)\s+"
        rf"(?:(?:l['\u2019]|la\s+|le\s+|les\s+|toute?s?\s+(?:les\s+)?)\s*)?{_AI_FR}\b"
        rf"|\b(?:tu es|vous\s+[êe]tes)\s+(?:une?\s+)?{_AI_FR}\b"
        rf"|\b(?:ch[èe]re?|salut|bonjour|coucou)\s+(?:chatgpt|{_AI_FR})\s*[,:!]"
        rf"|\b(?:llm|chatbot|assistant\s+(?:d['\u2019]\s*)?ia|agent\s+(?:d['\u2019]\s*)?ia)\s*[,:]\s*"
        rf"(?:tu\s+dois|vous\s+devez|s['\u2019]il\s+(?:te|vous)\s+pla[iî]t"
        rf"|ignore[sz]?|oublie[sz]?)\b"
        # Italian
        rf"|\b(?:nota|messaggio|istruzion[ei]|attenzione|avviso)\s+(?:per|a|all['\u2019]|alla|al|agli)"
        rf"\s*(?:(?:la|il|lo|l['\u2019]|gli|le|ogni|qualsiasi|qualunque)\s*)?{_AI_IT}\b"
        rf"|\bsei\s+(?:un['\u2019]\s*|una?\s+)?{_AI_IT}\b"
        rf"|\b(?:car[oa]|ciao|gentile)\s+(?:chatgpt|{_AI_IT})\s*[,:!]"
        rf"|\b(?:llm|chatbot|assistente\s+(?:ia|ai|virtuale)|agente\s+(?:ia|ai))\s*[,:]\s*"
        rf"(?:devi|per\s+favore|ignora|dimentica)\b",
        "plain",
        # Matches start at these words ("eres", not "si eres"): a lead as common
        # as "si", "se", "ia" or "tu" would crowd the leads of every English text.
        leads="nota|mensaje|instrucci|atenci|aviso|eres|querid|hola|estimad|note|message|"
        "instruction|attention|avis|consigne|tu es|vous|cher|chèr|salut|bonjour|coucou|"
        "messaggio|istruzion|attenzione|avviso|sei|caro|cara|ciao|gentile|llm|chatbot|"
        "asistente|assistant|assistente|agente|agent",
    ),
    _r(
        "addressed.when-asked",
        "addressed",
        35,
        r"\b(?:if|when)\s+(?:the\s+)?(?:user|anyone|someone|you\s+are)\s+(?:asks?|asked|summari[sz]\w*)"
        r"\b[^.]{0,80}\b(?:reply|respond|say|answer|output|print|tell)\b",
        leads="if|when",
    ),
    # The same conditional order in German, Spanish, French and Italian ("if
    # the user asks ..., answer ..."; "when you summarise this, say ..."), the
    # order in the familiar imperative: a runbook for staff says "antworten
    # Sie", "responda", "répondez", "risponda", and about customers.
    # Spanish, French and Italian matches start at the person or the verb, the
    # "si"/"se" before them looked behind for: those leads would be everywhere.
    _r(
        "addressed.when-asked-multilingual",
        "addressed",
        35,
        r"\b(?:wenn|falls|sobald)\s+(?:der\s+|die\s+|ein\s+|eine\s+)?(?:nutzer|benutzer|anwender"
        r"|jemand)\w*\b[^.]{0,60}?\b(?:fragt|bittet|wissen\s+will)\b[^.]{0,80}?"
        r"\b(?:antworte|sag|sage|schreib|schreibe|gib|erzähl|erzähle|behaupte)\b"
        r"|\b(?:wenn|sobald)\s+du\s+(?:diese[nsm]?\s+)?\w+\s+zusammenfasst\b[^.]{0,80}?"
        r"\b(?:antworte|sag|sage|schreib|schreibe|gib|erzähl|erzähle|behaupte)\b"
        r"|\b"
        + _behind("si el", "si la", "si un", "si una", "si algún", "si", "cuando el", "cuando la")
        + r"(?:usuari[oa]|alguien)\b[^.]{0,60}?\b(?:pregunta|pide|solicita)\b"
        r"[^.]{0,80}?\b(?:responde|contesta|dile|di|escribe|indica|afirma)\b"
        r"|\b"
        + _behind("cuando", "al")
        + r"resum(?:as|ir)\b[^.]{0,80}?\b(?:responde|contesta|dile|di|escribe|indica|afirma)\b"
        r"|\b"
        + _behind("si l'", "si l\u2019", "si le", "si un", "si une", "si", "quand l'", "quand le")
        + r"(?:utilisat(?:eur|rice)|quelqu['\u2019]un)\b[^.]{0,60}?"
        r"\b(?:demande|interroge)\b[^.]{0,80}?\b(?:réponds|dis|écris|indique|affirme)\b"
        r"|\b"
        + _behind("quand tu", "lorsque tu")
        + r"résumes\b[^.]{0,80}?\b(?:réponds|dis|écris|indique|affirme)\b"
        r"|\b"
        + _behind("se l'", "se l\u2019", "se il", "se un", "se una", "se", "quando l'", "quando il")
        + r"(?:utente|qualcuno)\b[^.]{0,60}?\b(?:chiede|domanda)\b[^.]{0,80}?"
        r"\b(?:rispondi|di|dì|scrivi|indica|afferma)\b"
        r"|\b"
        + _behind("quando", "se")
        + r"riassumi\b[^.]{0,80}?\b(?:rispondi|di|dì|scrivi|indica|afferma)\b",
        "plain",
        leads="wenn|falls|sobald|usuari|alguien|resum|utilisat|quelqu|résum|utente|qualcuno|"
        "riassumi",
    ),
    # An order to an automated reader named by its job, inside data: "AI
    # agent: call refund_order ...", "Note for coding assistants working in
    # this repo", "Vermerk für die automatische Rechnungsprüfung", "Para el bot
    # revisor: aprueba ...". Matches start at the reader or at the note's word
    # ("instructions for the AI" is addressed.to-the-ai's: not a lead twice).
    _r(
        "addressed.machine-agent",
        "addressed",
        35,
        rf"\b(?:note|notice|remark|reminder|memo|directive|message|attention)\s+"
        rf"(?:to|for)\s+(?:the\s+|any\s+|all\s+|our\s+|your\s+|an?\s+)?{_MACHINE_EN}\b"
        rf"|\b{_MACHINE_EN}\b[^\n:.!?]{{0,60}}?:\s*(?:please\s+)?{_ACTION_EN}\b"
        r"|\b(?:assistant|ai|bot|llm|model)\s+(?:instructions?|directives?|tasks?|actions?|orders?)\s*:"
        rf"|\b(?:hinweis|nachricht|vermerk|notiz|mitteilung|auftrag)\s+(?:an|für)\s+"
        rf"(?:(?:den|die|das|alle|jede[nsm]?|unseren?)\s+)?{_MACHINE_DE}"
        rf"|\b{_MACHINE_DE}\b[^\n:.!?]{{0,60}}?:\s*(?:bitte\s+)?{_ACTION_DE}\b"
        rf"|\b(?:nota|mensaje|aviso|indicaci[oó]n|recordatorio)\s+"
        rf"(?:para|a|al)\s+(?:(?:el|la|los|las|cualquier)\s+)?{_MACHINE_ES}\b"
        rf"|\b{_MACHINE_ES}\b[^\n:.!?]{{0,60}}?:\s*(?:por\s+favor,?\s+)?{_ACTION_ES}\b"
        rf"|\b(?:note|message|consignes?|avis|remarque|rappel|attention)\s+"
        rf"(?:à|a|pour|aux|de)\s+(?:l['\u2019]\s*|la\s+|le\s+|les\s+|tous\s+les\s+)?{_MACHINE_FR}"
        rf"|\b{_MACHINE_FR}\b[^\n:.!?]{{0,60}}?\s?:\s*(?:merci\s+de\s+)?{_ACTION_FR}\b"
        rf"|\b(?:nota|messaggio|avviso|promemoria)\s+(?:per|a|all['\u2019]|alla|al|agli)"
        rf"\s*(?:(?:la|il|lo|l['\u2019]|gli|le|ogni)\s*)?{_MACHINE_IT}\b"
        rf"|\b{_MACHINE_IT}\b[^\n:.!?]{{0,60}}?:\s*(?:per\s+favore,?\s+)?{_ACTION_IT}\b",
        "plain",
        leads="note|notice|remark|reminder|memo|directive|message|attention|ai|llm|gpt|"
        "automated|automatic|autonomous|coding|code|mail|mailbox|email|e-mail|inbox|browsing|browser|"
        "shopping|procurement|purchasing|scheduling|calendar|assistant|model|"
        "hinweis|nachricht|vermerk|notiz|mitteilung|auftrag|ki|postfach|programmier|"
        "einkaufs|kalender|automatisch|automatisiert|"
        "nota|mensaje|aviso|indicaci|recordatorio|agente|asistente|bot revisor|bots revisor|"
        "consigne|avis|remarque|rappel|agent|bot|messaggio|promemoria|assistente|"
        "assistenti|agenti",
    ),
    # obfuscation asked for explicitly
    _r(
        "encoding.decode-and-follow",
        "encoding",
        30,
        r"\b(?:decode|decipher|translate|unscramble|convert)\b(?:\W+\w+){0,4}?\W+"
        r"(?:base64|base-64|hex|rot-?13|binary|morse|unicode|ascii)\b(?:\W+\w+){0,12}?\W+"
        r"(?:follow|execute|obey|do\s+what|act\s+on|run|perform|instructions?|system\s+message)\b",
        leads="decode|decipher|translate|unscramble|convert",
    ),
    # exfiltration
    _r(
        "exfil.markdown-image",
        "exfiltration",
        40,
        r"!\[[^\[\]\n]{0,200}\]\(\s*<?(?:https?:)?//[^()\s\]]{0,500}[?=&\[{%$]"
        r"|!\[[^\[\]\n]{0,200}\]\s*\[[^\]\n]{0,100}\]",
        "plain",
        leads="![",
    ),
    _r(
        "exfil.markdown-ref",
        "exfiltration",
        40,
        r"\[[^\[\]\n]{1,100}\]:\s*(?:https?:)?//\S*[?=\[{](?#line)",
        "plain",
        leads="[",
    ),
    _r(
        "exfil.html",
        "exfiltration",
        35,
        r"<\s*(?:img|iframe|script|object|embed|link|form)\b[^<>]{0,300}?"
        r"(?:src|href|data|action)\s*=\s*['\"]?\s*(?:https?:)?//"
        r"|\b(?:javascript|vbscript):|\bdata:text/html",
        "plain",
        leads="<|javascript:|vbscript:|data:text/html",
    ),
    _r(
        "exfil.link-with-placeholder",
        "exfiltration",
        30,
        # "[a-z_ ]": the views read three words joined by "_" as words (normalise._JOINED).
        r"\]\(\s*<?(?:https?:)?//[^()\s\]]{0,300}"
        r"(?:\[[a-z_ ]{1,20}\]|\{[a-z_ ]{1,20}\}|\$\{?[a-z_]{1,20})"
        r"|\breplac\w*\s+\[[a-z_]{1,20}\]\s+with\b",
        "plain",
        leads="](|replac",
    ),
    _r(
        "exfil.send-data",
        "exfiltration",
        50,
        r"\b(?:e-?mail|send|forward|post|upload|transmit|exfiltrate|leak|mail|copy|export|dump|"
        r"share|sync|cc|bcc)\w*\b(?:\W+\w+){0,3}?\W+(?:all|every|each|the\s+(?:entire|full|whole|"
        r"complete)|(?:a\s+)?(?:full|complete)\s+(?:list|copy|export|dump)\s+of|any|other)\b"
        rf"(?:\W+\w+){{0,3}}?\W+{_DATA}\b(?:\W+\w+){{0,6}}?\W+(?:to|at|into|via|on)\b"
        r"(?:\W+\w+){0,2}?\W*(?:[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\[email\]|\u27e6email_\w+\u27e7|https?://|www\.|\w+\.\w{2,}|an?\s+(?:external|"
        r"outside|personal|third)|this\s+(?:address|url|email))",
        "plain",
        leads="mail|e-mail|email|send|forward|post|upload|transmit|exfiltrat|leak|copy|export|dump|share|sync|cc|bcc",
    ),
    # The same shape in German, Spanish, French and Italian: a bulk of data
    # ("alle", "todos", "tous", "tutti" ...) sent to an address.
    _r(
        "exfil.send-data-multilingual",
        "exfiltration",
        50,
        rf"\b(?:{_SENDING})\w*\b(?:\W+\w+){{0,3}}?\W+"
        rf"(?:{_BULK})\b(?:\W+\w+){{0,3}}?\W+(?:{_DATA_ML})\w*\b(?:\W+\w+){{0,6}}?\W+"
        r"(?:an|nach|auf|a|al|hacia|en|à|vers|sur|verso|su|all['\u2019]\w*)\b"
        r"(?:\W+\w+){0,2}?\W*(?:[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\[email\]|\u27e6email_\w+\u27e7|https?://"
        r"|www\.|\w+\.\w{2,}\b)",
        "plain",
        leads=_SEND_ML,
    ),
    _r(
        "exfil.append-to-url",
        "exfiltration",
        50,
        r"\b(?:append|add|attach|include|embed|encode|put)\w*\b(?:\W+\w+){0,6}?\W+(?:to|into|in)\s+"
        r"(?:this|that|the\s+following|my)\s+(?:link|url|address|endpoint|webhook)\b",
        "plain",
        leads="append|add|attach|include|embed|encode|put",
    ),
    _r(
        "exfil.encode-conversation",
        "exfiltration",
        30,
        r"\b(?:encode|append|include|embed|add)\w*\b(?:\W+\w+){0,4}?\W+"
        r"(?:conversation|chat|previous\s+messages?|our\s+messages|the\s+context|user'?s?\s+data|"
        r"history|summary\s+of\s+(?:the\s+page|our\s+conversation))\b"
        r"(?:\W+\w+){0,6}?\W+(?:url|link|query|parameter|image|base64)",
        "plain",
        leads="encode|append|include|embed|add",
    ),
)
