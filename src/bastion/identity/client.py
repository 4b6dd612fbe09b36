"""A script's side of the provider: the authorization code flow with PKCE and
a DPoP key, as ``bastion login``, the demo and the tests run it.

It speaks plain HTTP to the running api, exactly as a browser plus a public
client would (RFC 8252: a native app with a loopback redirect URI).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx

from bastion.identity.dpop import DpopKey
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256


class LoginFailed(Exception):
    """The provider refused the login; the message says what it answered."""


@dataclass
class TokenSet:
    """A DPoP-bound token pair and the private key it is bound to."""

    access_token: str
    refresh_token: str
    expires_in: int
    key: DpopKey

    def headers(self, method: str, url: str) -> dict[str, str]:
        """Return the Authorization and DPoP headers for one request."""
        return {
            "Authorization": f"DPoP {self.access_token}",
            "DPoP": self.key.proof(method, url, access_token=self.access_token),
        }


async def login(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    tenant: str,
    email: str,
    password: str,
    totp: str | None = None,
    client_id: str = CLI_CLIENT_ID,
    redirect_uri: str = CLI_REDIRECT_URI,
    key: DpopKey | None = None,
) -> TokenSet:
    """Run the code flow with PKCE S256 and return DPoP-bound tokens.

    Raises :class:`LoginFailed` with the provider's answer when it refuses.
    """
    key = key or DpopKey.generate()
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": state,
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
        "tenant": tenant,
    }
    page = await http.get(f"{base_url}/authorize", params=params)
    if page.status_code != 200:
        raise LoginFailed(f"authorize answered {page.status_code}")
    answer = await http.post(
        f"{base_url}/authorize", data={**params, "email": email, "password": password}
    )
    if answer.status_code == 200 and "name=ticket" in answer.text:
        if totp is None:
            raise LoginFailed("a TOTP code is required for this account")
        ticket = re.search(r'name=ticket value="([^"]+)"', answer.text)
        assert ticket is not None
        answer = await http.post(
            f"{base_url}/authorize/mfa", data={"ticket": ticket.group(1), "code": totp}
        )
    if answer.status_code != 303:
        raise LoginFailed(f"sign-in answered {answer.status_code}")
    location = urlsplit(answer.headers["location"])
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    if query.get("state") != state or query.get("iss") != base_url or "code" not in query:
        raise LoginFailed(f"bad redirect: {query.get('error', 'state or issuer mismatch')}")
    return await _token(
        http,
        base_url,
        key,
        {
            "grant_type": "authorization_code",
            "code": query["code"],
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
    )


async def refresh(
    http: httpx.AsyncClient, base_url: str, tokens: TokenSet, client_id: str = CLI_CLIENT_ID
) -> TokenSet:
    """Rotate ``tokens`` with the refresh grant; return the new pair."""
    return await _token(
        http,
        base_url,
        tokens.key,
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "client_id": client_id,
        },
    )


async def _token(
    http: httpx.AsyncClient, base_url: str, key: DpopKey, form: dict[str, str]
) -> TokenSet:
    url = f"{base_url}/token"
    answer = await http.post(url, data=form, headers={"DPoP": key.proof("POST", url)})
    if answer.status_code != 200:
        raise LoginFailed(f"token endpoint: {answer.json().get('error', answer.status_code)}")
    body = answer.json()
    if body.get("token_type") != "DPoP":
        raise LoginFailed("the provider did not bind the token to the DPoP key")
    return TokenSet(body["access_token"], body["refresh_token"], body["expires_in"], key)
