"""Sign-in (PKCE, DPoP), stolen tokens, refresh reuse, MFA step-up, two-person approval."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

import httpx
import pyotp

from bastion.db.pool import Database
from bastion.demo.common import DemoTenant, Report
from bastion.identity.client import LoginFailed, TokenSet, login, refresh
from bastion.identity.dpop import DpopKey
from bastion.identity.mfa import MfaService
from bastion.identity.passwords import PasswordService
from bastion.secrets.protocols import Keystore
from bastion.tenants.service import TenantService


async def _cli_login(env: dict[str, str], tenant: str, email: str, password: str) -> TokenSet:
    """Sign in as a script would: ``bastion login``, password on stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bastion",
        "login",
        "--tenant",
        tenant,
        "--email",
        email,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await proc.communicate(password.encode() + b"\n")
    if proc.returncode != 0:
        raise LoginFailed(err.decode().strip())
    body = json.loads(out)
    key = DpopKey.from_json(Path(body["dpop_key_file"]).read_text())
    return TokenSet(body["access_token"], body["refresh_token"], body["expires_in"], key)


async def check_identity(
    report: Report,
    db: Database,
    tenants: list[DemoTenant],
    api: str,
    keystore: Keystore,
    settings_env: dict[str, str],
) -> None:
    """Users sign in with PKCE and get DPoP-bound tokens; stolen tokens fail."""
    acme, globex = tenants
    # A fresh password per run: the demo keeps no credential in its code.
    password = secrets.token_urlsafe(18)
    mfa = MfaService(keystore)
    async with db.tenant_tx(acme.id, None, "system") as tx:
        for user_id in acme.users.values():
            await PasswordService().set_password(tx, user_id, password)
    tokens = await _cli_login(settings_env, acme.slug, "contributor@acme.example", password)
    async with httpx.AsyncClient(timeout=10) as http:
        me = await http.get(f"{api}/userinfo", headers=tokens.headers("GET", f"{api}/userinfo"))
        report.check(
            "identity",
            "contributor signs in with `bastion login` (PKCE S256, DPoP)",
            me.status_code == 200 and me.json()["tenant_id"] == str(acme.id),
            f"token_type DPoP, cnf.jkt {tokens.key.thumbprint[:12]}…, roles {me.json()['roles']}",
        )
        thief = DpopKey.generate()
        stolen = await http.get(
            f"{api}/userinfo",
            headers={
                "Authorization": f"DPoP {tokens.access_token}",
                "DPoP": thief.proof("GET", f"{api}/userinfo", access_token=tokens.access_token),
            },
        )
        report.check(
            "identity",
            "stolen token replayed with the thief's own key",
            stolen.status_code == 401,
            f"{stolen.status_code} {stolen.json()['type']}",
        )
        bearer = await http.get(
            f"{api}/userinfo", headers={"Authorization": f"Bearer {tokens.access_token}"}
        )
        report.check(
            "identity",
            "stolen token replayed as a bearer token",
            bearer.status_code == 401,
            f"{bearer.status_code}",
        )
        other = f"{api}/tenants/{globex.id}/members"
        cross = await http.get(other, headers=tokens.headers("GET", other))
        report.check(
            "identity",
            f"{acme.slug} token on a {globex.slug} path",
            cross.status_code == 404,
            f"{cross.status_code}, nothing of {globex.slug}",
        )
        rotated = await refresh(http, api, tokens)
        try:
            await refresh(http, api, tokens)
            reuse_refused = False
        except LoginFailed:
            reuse_refused = True
        try:
            await refresh(http, api, rotated)
            family_alive = True
        except LoginFailed:
            family_alive = False
        report.check(
            "identity",
            "refresh token reused: the whole family is revoked",
            reuse_refused and not family_alive,
            "audited as refresh_token.reuse",
        )

        owner = await login(
            http, api, tenant=acme.slug, email="owner@acme.example", password=password
        )
        audit_url = f"{api}/tenants/{acme.id}/audit"
        weak = await http.get(audit_url, headers=owner.headers("GET", audit_url))
        report.check(
            "identity",
            "owner without MFA reads the audit trail",
            weak.status_code == 403,
            f"{weak.status_code}: step-up to MFA asked",
        )
        async with db.tenant_tx(acme.id, None, "system") as tx:
            secret, _uri = await mfa.enroll(tx, acme.users["owner"], "owner@acme.example")
            await mfa.confirm(tx, acme.users["owner"], pyotp.TOTP(secret).now())
        next_code = pyotp.TOTP(secret).at(int(time.time()) + 30)
        strong = await login(
            http,
            api,
            tenant=acme.slug,
            email="owner@acme.example",
            password=password,
            totp=next_code,
        )
        allowed = await http.get(audit_url, headers=strong.headers("GET", audit_url))
        report.check(
            "identity",
            "owner with TOTP reads the audit trail",
            allowed.status_code == 200,
            f"amr pwd+otp+mfa, {len(allowed.json().get('events', []))} events",
        )

        # Two-person rule: the owner asks to make the viewer a billing-admin;
        # it waits until a second owner (also signed in with TOTP) approves.
        second_id = await TenantService(db).add_member(
            acme.id, "second.owner@acme.example", "owner", actor="demo"
        )
        async with db.tenant_tx(acme.id, None, "system") as tx:
            await PasswordService().set_password(tx, second_id, password)
            second_secret, _uri = await mfa.enroll(tx, second_id, "second.owner@acme.example")
            await mfa.confirm(tx, second_id, pyotp.TOTP(second_secret).now())
        second = await login(
            http,
            api,
            tenant=acme.slug,
            email="second.owner@acme.example",
            password=password,
            totp=pyotp.TOTP(second_secret).at(int(time.time()) + 30),
        )
        members = f"{api}/tenants/{acme.id}/members"
        asked = await http.post(
            members,
            headers=strong.headers("POST", members),
            json={"email": "viewer@acme.example", "role": "billing-admin"},
        )
        report.check(
            "approval",
            "owner grants billing-admin to the viewer",
            asked.status_code == 202,
            "pending: a second owner must approve",
        )
        approve = f"{api}/tenants/{acme.id}/role-requests/{asked.json().get('request_id')}/approve"
        own = await http.post(approve, headers=strong.headers("POST", approve))
        report.check(
            "approval",
            "the same owner approves their own request",
            own.status_code == 403,
            f"{own.status_code} {own.json().get('reason')}",
        )
        viewer_tokens = await login(
            http, api, tenant=acme.slug, email="viewer@acme.example", password=password
        )
        early = await http.post(approve, headers=viewer_tokens.headers("POST", approve))
        report.check(
            "approval",
            "the viewer approves it",
            early.status_code == 403,
            f"{early.status_code}: Cedar denies member:approve",
        )
        done = await http.post(approve, headers=second.headers("POST", approve))
        report.check(
            "approval",
            "a second owner with MFA approves",
            done.status_code == 200,
            f"viewer is now {sorted(await db.member_roles(acme.id, acme.users['viewer']))}",
        )
        revoke = f"{members}/{acme.users['viewer']}/roles/billing-admin"
        gone = await http.delete(revoke, headers=second.headers("DELETE", revoke))
        after = await http.get(members, headers=viewer_tokens.headers("GET", members))
        report.check(
            "approval",
            "role revoked: the holder's next request",
            gone.status_code == 204 and after.status_code == 200,
            "billing-admin gone at once; viewer rights remain",
        )
