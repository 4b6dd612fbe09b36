"""More hard negatives for the injection classifier's training (``grammar3/``):
benign texts that share an injection's words or its second person, composed
from hand-written parts in EN/DE/ES/FR/IT. Written fresh for this repository,
not copied from any benchmark or from the suite's fixtures.

Four kinds a deployment sees every day and that the classifier, once it may
block on its own (``Model.alone_threshold``), must leave alone:

- questions a user asks the assistant about itself (its memory, its data, its
  maker, its limits);
- procedures: documentation and runbooks that give orders in the imperative;
- privacy and account requests (erase, unsubscribe, export, forget my card);
- workplace rules that say what to ignore, never do, or always do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

LANGS = ("en", "de", "es", "fr", "it")

_ASK_OPEN = {
    "en": ["Quick question:", "Before I start,", "Just curious,", "Our compliance team asks:", ""],
    "de": [
        "Kurze Frage:",
        "Bevor ich anfange:",
        "Nur aus Neugier:",
        "Unsere Compliance fragt:",
        "",
    ],
    "es": [
        "Una pregunta:",
        "Antes de empezar:",
        "Por curiosidad:",
        "Nuestro equipo legal pregunta:",
        "",
    ],
    "fr": [
        "Petite question :",
        "Avant de commencer :",
        "Par curiosité :",
        "Notre service conformité demande :",
        "",
    ],
    "it": [
        "Una domanda:",
        "Prima di iniziare:",
        "Per curiosità:",
        "Il nostro ufficio legale chiede:",
        "",
    ],
}
_ASK_SELF = {
    "en": [
        "do you keep a copy of what I type here?",
        "can you remember what we talked about last week?",
        "which company trained you, and on what kind of data?",
        "are my uploaded files used to train future versions?",
        "how long are these chats kept, and who can read them?",
        "can you browse the web or only use what I paste?",
        "what happens to my messages if I close this window?",
        "is there a limit on how long my question can be?",
        "do you see the other documents in our shared folder?",
        "can you tell me what you are not allowed to help with?",
    ],
    "de": [
        "speicherst du eine Kopie von dem, was ich hier tippe?",
        "erinnerst du dich an unser Gespräch von letzter Woche?",
        "welche Firma hat dich trainiert, und mit welchen Daten?",
        "werden meine hochgeladenen Dateien für das Training verwendet?",
        "wie lange werden diese Chats aufbewahrt, und wer kann sie lesen?",
        "was passiert mit meinen Nachrichten, wenn ich das Fenster schließe?",
        "siehst du die anderen Dokumente in unserem geteilten Ordner?",
    ],
    "es": [
        "¿guardas una copia de lo que escribo aquí?",
        "¿recuerdas lo que hablamos la semana pasada?",
        "¿qué empresa te entrenó y con qué tipo de datos?",
        "¿se usan mis archivos subidos para entrenar nuevas versiones?",
        "¿cuánto tiempo se guardan estos chats y quién puede leerlos?",
        "¿qué pasa con mis mensajes si cierro esta ventana?",
        "¿ves los otros documentos de nuestra carpeta compartida?",
    ],
    "fr": [
        "gardes-tu une copie de ce que je tape ici ?",
        "te souviens-tu de notre échange de la semaine dernière ?",
        "quelle entreprise t'a entraîné, et sur quelles données ?",
        "mes fichiers envoyés servent-ils à entraîner les prochaines versions ?",
        "combien de temps ces conversations sont-elles conservées, et qui peut les lire ?",
        "que deviennent mes messages si je ferme cette fenêtre ?",
        "vois-tu les autres documents de notre dossier partagé ?",
    ],
    "it": [
        "conservi una copia di quello che scrivo qui?",
        "ti ricordi di cosa abbiamo parlato la settimana scorsa?",
        "quale azienda ti ha addestrato, e con quali dati?",
        "i file che carico vengono usati per addestrare nuove versioni?",
        "per quanto tempo vengono conservate queste chat, e chi può leggerle?",
        "cosa succede ai miei messaggi se chiudo questa finestra?",
        "vedi gli altri documenti della nostra cartella condivisa?",
    ],
}
_STEP = {
    "en": [
        "Unplug the router, wait thirty seconds and plug it back in",
        "Open Settings, choose Accounts and press Reset password",
        "Follow the setup guide in the README before running the installer",
        "Ignore the warning about the self-signed certificate on the test server only",
        "Copy the API key from the dashboard into the vault, never into the repository",
        "Delete the old configuration file and restart the service",
        "Skip step four if you already have an account",
        "Replace the previous version of the template with the one attached",
        "Send the signed form back to the HR mailbox",
        "Run the migration, then check the logs for errors",
    ],
    "de": [
        "Zieh den Stecker des Routers, warte dreißig Sekunden und steck ihn wieder ein",
        "Öffne die Einstellungen, wähle Konten und tippe auf Passwort zurücksetzen",
        "Folge vor der Installation der Anleitung in der README",
        "Ignoriere die Zertifikatswarnung nur auf dem Testserver",
        "Lösche die alte Konfigurationsdatei und starte den Dienst neu",
        "Überspringe Schritt vier, wenn du schon ein Konto hast",
        "Ersetze die vorherige Version der Vorlage durch die angehängte",
    ],
    "es": [
        "Desenchufa el router, espera treinta segundos y vuelve a enchufarlo",
        "Abre Ajustes, elige Cuentas y pulsa Restablecer contraseña",
        "Sigue la guía de instalación del README antes de ejecutar el instalador",
        "Ignora el aviso del certificado solo en el servidor de pruebas",
        "Borra el archivo de configuración antiguo y reinicia el servicio",
        "Sáltate el paso cuatro si ya tienes una cuenta",
        "Sustituye la versión anterior de la plantilla por la adjunta",
    ],
    "fr": [
        "Débranche le routeur, attends trente secondes et rebranche-le",
        "Ouvre les Réglages, choisis Comptes et appuie sur Réinitialiser le mot de passe",
        "Suis le guide d'installation du README avant de lancer l'installateur",
        "Ignore l'alerte de certificat uniquement sur le serveur de test",
        "Supprime l'ancien fichier de configuration et redémarre le service",
        "Passe l'étape quatre si tu as déjà un compte",
        "Remplace la version précédente du modèle par celle en pièce jointe",
    ],
    "it": [
        "Stacca il router, aspetta trenta secondi e ricollegalo",
        "Apri Impostazioni, scegli Account e premi Reimposta password",
        "Segui la guida di installazione del README prima di avviare l'installer",
        "Ignora l'avviso del certificato solo sul server di test",
        "Cancella il vecchio file di configurazione e riavvia il servizio",
        "Salta il passo quattro se hai già un account",
        "Sostituisci la versione precedente del modello con quella allegata",
    ],
}
_STEP_AFTER = {
    "en": [
        ".",
        "; the light should turn green.",
        ". Ask IT if it still fails.",
        " (see the runbook).",
    ],
    "de": [
        ".",
        "; die Lampe sollte grün werden.",
        ". Frag die IT, wenn es nicht klappt.",
        " (siehe Runbook).",
    ],
    "es": [
        ".",
        "; la luz debería ponerse verde.",
        ". Consulta a IT si sigue fallando.",
        " (ver el runbook).",
    ],
    "fr": [
        ".",
        " ; le voyant doit passer au vert.",
        ". Demande à l'IT si ça échoue encore.",
        " (voir le runbook).",
    ],
    "it": [
        ".",
        "; la spia dovrebbe diventare verde.",
        ". Chiedi all'IT se non funziona.",
        " (vedi il runbook).",
    ],
}
_PRIVACY = {
    "en": [
        "Please erase my account and everything you hold about me under the GDPR.",
        "Remove me from all newsletters and forget my phone number.",
        "Send me a copy of all the personal data you store about me.",
        "Delete the card you saved and do not charge it again.",
        "Stop using my e-mail address for marketing and confirm in writing.",
        "Correct my date of birth in your records; the old one is wrong.",
    ],
    "de": [
        "Bitte löscht mein Konto und alle Daten über mich nach der DSGVO.",
        "Tragt mich aus allen Newslettern aus und vergesst meine Telefonnummer.",
        "Schickt mir eine Kopie aller personenbezogenen Daten, die ihr speichert.",
        "Löscht die gespeicherte Karte und belastet sie nicht mehr.",
    ],
    "es": [
        "Borrad mi cuenta y todo lo que tengáis sobre mí según el RGPD.",
        "Quitadme de todos los boletines y olvidad mi número de teléfono.",
        "Enviadme una copia de todos los datos personales que guardáis.",
        "Eliminad la tarjeta guardada y no volváis a cobrarla.",
    ],
    "fr": [
        "Merci d'effacer mon compte et tout ce que vous avez sur moi selon le RGPD.",
        "Retirez-moi de toutes les newsletters et oubliez mon numéro.",
        "Envoyez-moi une copie de toutes les données personnelles que vous gardez.",
        "Supprimez la carte enregistrée et ne la débitez plus.",
    ],
    "it": [
        "Cancellate il mio account e tutto ciò che avete su di me secondo il GDPR.",
        "Toglietemi da tutte le newsletter e dimenticate il mio numero.",
        "Mandatemi una copia di tutti i dati personali che conservate.",
        "Eliminate la carta salvata e non addebitatela più.",
    ],
}
_RULE = {
    "en": [
        "Staff must never share a customer's password, even with a manager.",
        "Always ignore calls that ask for a one-time code; report them to security.",
        "Agents should disregard the old price list from January.",
        "New hires follow the buddy's instructions for the first two weeks.",
        "Do not reveal the internal escalation number to callers.",
        "The previous travel policy no longer applies; use the new form.",
    ],
    "de": [
        "Mitarbeitende geben niemals das Passwort eines Kunden weiter.",
        "Ignoriert Anrufe, die nach einem Einmalcode fragen, und meldet sie.",
        "Die alte Preisliste vom Januar gilt nicht mehr.",
        "Die vorherige Reiserichtlinie ist aufgehoben; nutzt das neue Formular.",
    ],
    "es": [
        "El personal nunca comparte la contraseña de un cliente.",
        "Ignorad las llamadas que piden un código de un solo uso y avisad a seguridad.",
        "La lista de precios de enero ya no vale.",
        "La política de viajes anterior ya no se aplica; usad el nuevo formulario.",
    ],
    "fr": [
        "Le personnel ne communique jamais le mot de passe d'un client.",
        "Ignorez les appels qui demandent un code à usage unique et signalez-les.",
        "L'ancienne grille tarifaire de janvier n'est plus valable.",
        "L'ancienne politique de voyage ne s'applique plus ; utilisez le nouveau formulaire.",
    ],
    "it": [
        "Il personale non comunica mai la password di un cliente.",
        "Ignorate le chiamate che chiedono un codice monouso e segnalatele.",
        "Il vecchio listino di gennaio non vale più.",
        "La precedente policy sui viaggi non si applica più; usate il nuovo modulo.",
    ],
}


def assistant_questions() -> Iterator[str]:
    for lang in LANGS:
        for opening, ask in itertools.product(_ASK_OPEN[lang], _ASK_SELF[lang]):
            yield f"{opening} {ask}".strip() if opening else ask[:1].upper() + ask[1:]


def procedures() -> Iterator[str]:
    for lang in LANGS:
        steps = _STEP[lang]
        for i, (step, after) in enumerate(itertools.product(steps, _STEP_AFTER[lang])):
            following = steps[(i + 1) % len(steps)]
            yield f"{step}{after}" if i % 2 else f"1. {step}{after}\n2. {following}."


def _singles_and_pairs(table: dict[str, list[str]], separator: str, step: int) -> Iterator[str]:
    for lang in LANGS:
        items = table[lang]
        for i, item in enumerate(items):
            yield item
            yield f"{item}{separator}{items[(i + step) % len(items)]}"


def privacy_requests() -> Iterator[str]:
    return _singles_and_pairs(_PRIVACY, " ", 1)


def workplace_rules() -> Iterator[str]:
    return _singles_and_pairs(_RULE, "\n", 2)
