"""Configuration holds references only (issue 17, item 3).

A literal secret in a setting or a ``BASTION_*`` variable stops a real
``bastion serve api`` at start-up with one line naming the setting, never the
value; references start; ``BASTION_DEV_MODE=1`` (``make demo``) allows literals.
Every literal is assembled here at run time, so the repository holds none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.settings import LiteralSecretInSettings, Settings

STRIPE_KEY = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dcQ9"
WEBHOOK_SECRET = "whsec_" + "Zq81kQ02mMab92LqPz7Tw1HxYc"
OPENAI_KEY = "sk-" + "proj-" + "Q2w3E4r5T6y7U8i9O0pAsDfGhJkL"
DB_PASSWORD = "Pg" + "pass-" + "0rQ7zX"

# (variable, value, the setting the message must name)
LITERALS = [
    ("BASTION_STRIPE_WEBHOOK_SECRET_REF", WEBHOOK_SECRET, "stripe_webhook_secret_ref"),
    ("BASTION_ADYEN_HMAC_KEY_REF", "A1B2C3D4E5F6" * 4, "adyen_hmac_key_ref"),
    ("BASTION_BILLING_STRIPE_API_KEY_REF", STRIPE_KEY, "billing_stripe_api_key_ref"),
    (
        "BASTION_GATEWAY_MODELS",
        json.dumps([{"name": "m", "provider": "openai_compatible", "api_key_ref": OPENAI_KEY}]),
        "gateway_models[0].api_key_ref",
    ),
    ("DATABASE_URL", f"postgresql://bastion:{DB_PASSWORD}@127.0.0.1:5/bastion", "database_url"),
    ("DATABASE_URL", f"host=127.0.0.1 dbname=bastion password={DB_PASSWORD}", "database_url"),
    ("BASTION_ISSUER", f"https://admin:{DB_PASSWORD}@id.example.com", "issuer"),
    ("BASTION_OPENAI_API_KEY", OPENAI_KEY, "BASTION_OPENAI_API_KEY"),  # read by nothing
]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k != "DATABASE_URL"
    }
    return {**env, "BASTION_HOME": str(tmp_path / "home"), "BASTION_EMBEDDER": "hashing", **extra}


def _bastion(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("variable", "value", "setting"), LITERALS)
def test_literal_secret_stops_serve_at_start_up(
    tmp_path: Path, variable: str, value: str, setting: str
) -> None:
    result = _bastion(_env(tmp_path, **{variable: value}), "serve", "api")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"literal secret in {setting}:" in lines[0]
    assert "references only" in lines[0]
    secret = DB_PASSWORD if variable in ("DATABASE_URL", "BASTION_ISSUER") else value
    assert secret not in result.stderr + result.stdout
    # Refused before anything was created: no database, no key ring.
    assert not (tmp_path / "home").exists()
    assert not (tmp_path / "home-keys").exists()


def test_development_mode_allows_literals(tmp_path: Path) -> None:
    env = _env(tmp_path, BASTION_BILLING_STRIPE_API_KEY_REF=STRIPE_KEY)
    refused = _bastion(env, "secrets", "list")
    assert refused.returncode == 1 and "billing_stripe_api_key_ref" in refused.stderr
    allowed = _bastion({**env, "BASTION_DEV_MODE": "1"}, "secrets", "list")
    assert allowed.returncode == 0, allowed.stderr
    assert "literal_secrets_allowed" in allowed.stderr  # said, with the name only
    assert STRIPE_KEY not in allowed.stderr + allowed.stdout


def test_development_mode_takes_no_live_payments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_DEV_MODE", "1")
    monkeypatch.setenv("BASTION_STRIPE_LIVEMODE", "true")
    with pytest.raises(LiteralSecretInSettings, match="live payments"):
        Settings()


def test_references_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("BASTION_") or k == "DATABASE_URL"]:
        monkeypatch.delenv(name)
    refs = {
        "BASTION_STRIPE_WEBHOOK_SECRET_REF": "bao://kv/bastion/stripe#webhook_secret",
        "BASTION_ADYEN_HMAC_KEY_REF": "awskms://alias/bastion-adyen",
        "BASTION_BILLING_STRIPE_API_KEY_REF": "local://billing/stripe-api-key#2",
        "BASTION_DATABASE_PASSWORD_REF": "local://db/external-admin",
        "DATABASE_URL": "postgresql://bastion@db.internal:5432/bastion",
        "BASTION_GATEWAY_MODELS": json.dumps(
            [{"name": "m", "provider": "openai_compatible", "api_key_ref": "local://p/openai"}]
        ),
    }
    for name, value in refs.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.stripe_webhook_secret_ref == refs["BASTION_STRIPE_WEBHOOK_SECRET_REF"]
    assert settings.database_password_ref == "local://db/external-admin"
