"""Benchmark: the injection screen on each other author's set, scored by a
classifier that never saw it (leave one author out), beside the classifier
trained on no author's set: what training on independent authors buys.

For each set in ``injection_data.AUTHOR_SETS`` (``bench/injection_authors/``)
a model is trained on every other set (``bench/train_injection.py --authors``,
deterministic, about two minutes each), and the whole screen, with that model,
judges the left-out set as written (user turns and retrieved documents). The
model trained on none of them judges every set the same way. Session 13 chose
to train on all six sets by this comparison (a variant's false positives must
not exceed the model's without them). Session 14 ran it over ten sets (four
more, t4-t7) and kept the six: trained on ten, the screen caught fewer attacks
on the sets left out (908 of 1,800 against 970). Since session 17 the sets are
added by a rule judged on sets no variant saw (``injection_data.AUTHOR_SETS``).

Run: .venv/bin/python bench/injection_authors.py   (about fifteen minutes)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import injection_data
from _record import record, row

BENCH = Path(__file__).resolve().parent


def _train(authors: tuple[str, ...], out: Path) -> None:
    subprocess.run(
        [sys.executable, str(BENCH / "train_injection.py"), "--authors", ",".join(authors),
         "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _judge(model: Path, names: list[str]) -> dict[str, tuple[int, int, int, int]]:
    """(attacks flagged, attacks, benign flagged, benign) per set, by the whole
    screen with ``model``, in a process of its own (the model loads once)."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bastion.safety.injection import classifier, screen\n"
        "classifier.MODEL_PATH = Path(sys.argv[1])\n"
        "out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    t = [0, 0, 0, 0]\n"
        "    for c in json.loads(Path(path).read_text('utf-8'))['cases']:\n"
        "        i = 0 if c['kind'] == 'attack' else 2\n"
        "        t[i] += screen(c['text'], c['source']).decision != 'allow'\n"
        "        t[i + 1] += 1\n"
        "    out[Path(path).stem] = t\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(injection_data.AUTHORS / f"{name}.json") for name in names]
    done = subprocess.run(
        [sys.executable, "-c", script, str(model), *paths], check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    return {name: tuple(counts) for name, counts in json.loads(done.stdout).items()}


def main() -> None:
    names = list(injection_data.AUTHOR_SETS)
    with tempfile.TemporaryDirectory(prefix="bastion-loao-") as tmp:
        none = Path(tmp) / "none.npz"
        _train((), none)
        without_any = _judge(none, names)
        left_out: dict[str, tuple[int, int, int, int]] = {}
        for name in names:
            model = Path(tmp) / f"without-{name}.npz"
            _train(tuple(other for other in names if other != name), model)
            left_out.update(_judge(model, [name]))
    print("whole screen on each author's set, as written (flagged of n)")
    print(f"{'set':6} {'trained on none':>22} {'trained on the others':>24}")
    totals = {"none": [0, 0, 0, 0], "others": [0, 0, 0, 0]}
    for name in names:
        a, b = without_any[name], left_out[name]
        print(f"{name:6} {a[0]:4}/{a[1]} at {a[2]:3}/{a[3]}    {b[0]:4}/{b[1]} at {b[2]:3}/{b[3]}")
        for key, counts in (("none", a), ("others", b)):
            totals[key] = [x + y for x, y in zip(totals[key], counts, strict=True)]
    rows = []
    for key, label in (("none", "trained on no author's set"), ("others", "left out in turn")):
        t = totals[key]
        line = f"{t[0]}/{t[1]} attacks ({t[0] / t[1]:.1%}) at {t[2]}/{t[3]} hard negatives"
        print(f"  all sets, {label}: {line}")
        rows.append(row(f"other authors' sets, {label}", line))
    texts = sum(totals["none"][1::2])
    record(
        "injection_authors",
        rows,
        notes=f"whole screen as written; {len(names)} sets, {texts:,} texts",
    )


if __name__ == "__main__":
    main()
