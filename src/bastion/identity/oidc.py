"""HTTP endpoints of the built-in OpenID Connect provider. Thin: parse, call
:class:`IdentityService`, answer. Errors follow RFC 6749 (sections 4.1.2.1 and
5.2) where the standard fixes their shape, and RFC 9457 elsewhere."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import asdict
from html import escape
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from bastion.access.guard import Guard
from bastion.api.declare import PUBLIC_ROUTE, public
from bastion.encoding import b64url_decode, b64url_encode
from bastion.identity.auth import Principal
from bastion.identity.dpop import DpopVerifier
from bastion.identity.errors import InvalidDpopProof, Throttled
from bastion.identity.keys import SigningKeys
from bastion.identity.replay import SharedReplayStore
from bastion.identity.service import (
    AuthorizationRequest,
    ClientError,
    IdentityService,
    LoginResult,
    OAuthError,
    amr_for,
)

_MAX_FORM_FIELD = 4096
_TICKET_LIFETIME = 300
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_OAUTH_FIELDS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "state",
    "scope",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "tenant",
)


class LoginTickets:
    """Short-lived, HMAC-signed proof that the password step passed, carried
    by the TOTP form instead of the password itself."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, login: LoginResult, request: AuthorizationRequest) -> str:
        body = json.dumps(
            {
                "u": str(login.user_id),
                "t": str(login.tenant_id),
                "r": list(login.roles),
                "q": asdict(request),
                "exp": int(time.time()) + _TICKET_LIFETIME,
            }
        ).encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()
        return b64url_encode(mac + body)

    def open(self, ticket: str) -> tuple[LoginResult, AuthorizationRequest] | None:
        try:
            # Strict (one spelling per ticket): no padding, no stray characters.
            raw = b64url_decode(ticket)
        except ValueError:
            return None
        mac, body = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            return None
        data = json.loads(body)
        if data["exp"] < time.time():
            return None
        login = LoginResult(UUID(data["u"]), UUID(data["t"]), tuple(data["r"]), True)
        return login, AuthorizationRequest(**data["q"])


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><meta name=viewport content='width=device-width'>"
        "<style>body{font-family:system-ui;max-width:26rem;margin:3rem auto}"
        "label,input,button{display:block;width:100%;margin:.3rem 0}"
        ".error{color:#a00}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    headers = {
        **_NO_STORE,
        # The login page must not be framed (clickjacking) nor load anything.
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
        "form-action 'self'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
    }
    return HTMLResponse(html, status_code=status, headers=headers)


def _hidden(request: AuthorizationRequest) -> str:
    fields = {
        "client_id": request.client_id,
        "redirect_uri": request.redirect_uri,
        "response_type": "code",
        "state": request.state or "",
        "scope": request.scope,
        "nonce": request.nonce or "",
        "code_challenge": request.code_challenge,
        "code_challenge_method": "S256",
    }
    return "".join(
        f'<input type=hidden name={name} value="{escape(value)}">' for name, value in fields.items()
    )


def _login_form(request: AuthorizationRequest, error: str = "", status: int = 200) -> HTMLResponse:
    message = f"<p class=error>{escape(error)}</p>" if error else ""
    return _page(
        "Sign in to Bastion",
        f"{message}<form method=post action=/authorize>{_hidden(request)}"
        f'<label>Workspace<input name=tenant value="{escape(request.tenant)}" required></label>'
        "<label>E-mail<input name=email type=email autocomplete=username required></label>"
        "<label>Password<input name=password type=password autocomplete=current-password "
        "required></label><button>Sign in</button></form>",
        status,
    )


def _totp_form(ticket: str, error: str = "", status: int = 200) -> HTMLResponse:
    message = f"<p class=error>{escape(error)}</p>" if error else ""
    return _page(
        "Second factor",
        f"{message}<form method=post action=/authorize/mfa>"
        f'<input type=hidden name=ticket value="{escape(ticket)}">'
        "<label>Authenticator code or recovery code<input name=code autocomplete=one-time-code "
        "required></label><button>Continue</button></form>",
        status,
    )


def _redirect_error(
    request: AuthorizationRequest | None, params: dict[str, str], error: OAuthError, issuer: str
) -> Response:
    target = request.redirect_uri if request else params["redirect_uri"]
    query = {"error": error.error, "error_description": error.description, "iss": issuer}
    state = request.state if request else params.get("state")
    if state:
        query["state"] = state
    return RedirectResponse(f"{target}?{urlencode(query)}", status_code=303, headers=_NO_STORE)


def _oauth_json_error(error: OAuthError, nonce: str | None = None) -> JSONResponse:
    headers = dict(_NO_STORE)
    if nonce is not None:
        # RFC 9449 section 8: "use_dpop_nonce" carries the nonce to echo.
        headers["DPoP-Nonce"] = nonce
    return JSONResponse(
        {"error": error.error, "error_description": error.description},
        status_code=error.status,
        headers=headers,
    )


async def _form(request: Request) -> dict[str, str]:
    """Parse a urlencoded form strictly: bounded, UTF-8, one value per name."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise OAuthError("invalid_request", "expected application/x-www-form-urlencoded")
    try:
        form = await request.form(max_files=0, max_fields=32)
    except Exception:  # malformed bodies of any kind are the client's error
        raise OAuthError("invalid_request", "malformed form body") from None
    fields: dict[str, str] = {}
    for name in form:
        values = form.getlist(name)
        if len(values) != 1 or not isinstance(values[0], str):
            raise OAuthError("invalid_request", f"parameter {name!r} must appear once")
        if len(values[0]) > _MAX_FORM_FIELD:
            raise OAuthError("invalid_request", f"parameter {name!r} is too long")
        fields[name] = values[0]
    return fields


def _query(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    for name in _OAUTH_FIELDS:
        values = request.query_params.getlist(name)
        if len(values) > 1:
            raise ClientError("invalid_request", f"parameter {name!r} must appear once")
        if values:
            params[name] = values[0][:_MAX_FORM_FIELD]
    return params


_OAUTH_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
# RFC 6749 section 4.1.3 / 6 with PKCE (RFC 7636) and DPoP (RFC 9449 section 5).
_TOKEN_OPENAPI: dict[str, Any] = {
    "externalDocs": {
        "description": "OpenID Connect discovery of this provider",
        "url": "/.well-known/openid-configuration",
    },
    "parameters": [
        {
            "name": "DPoP",
            "in": "header",
            "required": True,
            "description": "A DPoP proof for POST /token, with the server nonce (RFC 9449 "
            "section 8); a 400 use_dpop_nonce carries the nonce in DPoP-Nonce.",
            "schema": {"type": "string"},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "client_id"],
                    "properties": {
                        "grant_type": {"enum": ["authorization_code", "refresh_token"]},
                        "client_id": {"type": "string", "maxLength": _MAX_FORM_FIELD},
                        "code": {"type": "string", "maxLength": _MAX_FORM_FIELD},
                        "redirect_uri": {"type": "string", "maxLength": _MAX_FORM_FIELD},
                        "code_verifier": {"type": "string", "maxLength": _MAX_FORM_FIELD},
                        "refresh_token": {"type": "string", "maxLength": _MAX_FORM_FIELD},
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "DPoP-bound tokens (token_type DPoP)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "400": {
            "description": "RFC 6749 section 5.2 error",
            "content": {"application/json": {"schema": _OAUTH_ERROR}},
        },
        "401": {
            "description": "RFC 6749 section 5.2 error",
            "content": {"application/json": {"schema": _OAUTH_ERROR}},
        },
    },
}


def _form_body(*fields: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A form request body of text ``fields`` (each capped like every form field)."""
    properties = {name: {"type": "string", "maxLength": _MAX_FORM_FIELD} for name in fields}
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": schema}},
    }


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}}
_OAUTH_JSON_400 = {
    "description": "RFC 6749 section 5.2 error",
    "content": {"application/json": {"schema": _OAUTH_ERROR}},
}
# The sign-in pages (RFC 6749 section 4.1.1; errors shown, not redirected,
# when the client or its redirect URI cannot be trusted: section 4.1.2.1).
_SIGN_IN_RESPONSES: dict[str, Any] = {
    "200": _html("The sign-in (or second factor) page"),
    "303": {"description": "Back to the client's redirect URI with a code or an error"},
    "400": _html("The request cannot be trusted: shown, not redirected"),
    "401": _html("Wrong credentials or code: the page again"),
    "429": {**_html("Too many attempts: the page again"), "headers": _RETRY_AFTER},
}
_AUTHORIZE_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": name in ("response_type", "client_id", "redirect_uri"),
            "schema": {"type": "string", "maxLength": _MAX_FORM_FIELD},
        }
        for name in _OAUTH_FIELDS
    ],
    "responses": _SIGN_IN_RESPONSES,
}
_AUTHORIZE_LOGIN_OPENAPI: dict[str, Any] = {
    "requestBody": _form_body(*_OAUTH_FIELDS, "email", "password"),
    "responses": _SIGN_IN_RESPONSES,
}
_AUTHORIZE_MFA_OPENAPI: dict[str, Any] = {
    "requestBody": _form_body("ticket", "code"),
    "responses": _SIGN_IN_RESPONSES,
}
# RFC 7009 (revocation); logout revokes the session's refresh token and says so.
_REVOKE_OPENAPI: dict[str, Any] = {
    "requestBody": _form_body("token", "client_id"),
    "responses": {"200": {"description": "Revoked (or nothing to revoke)"}, "400": _OAUTH_JSON_400},
}
_LOGOUT_OPENAPI: dict[str, Any] = {
    "requestBody": _form_body("refresh_token", "client_id"),
    "responses": {"200": _html("Signed out"), "400": _OAUTH_JSON_400},
}


def build_router(
    service: IdentityService,
    *,
    keys: SigningKeys,
    dpop: DpopVerifier,
    guard: Guard,
    tickets: LoginTickets,
    issuer: str,
    replay_store: SharedReplayStore | None = None,
    nonce_at_token: bool = True,
) -> APIRouter:
    """Return the provider's routes bound to their services.

    ``nonce_at_token``: proofs at /token must echo a server nonce (RFC 9449
    section 8). ``replay_store``: a proof used at any process is refused at
    every other (section 11.1); None keeps to this process's memory.
    """
    router = APIRouter()
    token_url = f"{issuer}/token"

    @router.get("/.well-known/openid-configuration", **PUBLIC_ROUTE)
    async def discovery() -> dict[str, Any]:
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": token_url,
            "userinfo_endpoint": f"{issuer}/userinfo",
            "revocation_endpoint": f"{issuer}/revoke",
            "end_session_endpoint": f"{issuer}/logout",
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "authorization_response_iss_parameter_supported": True,
        }

    @router.get("/.well-known/jwks.json", **PUBLIC_ROUTE)
    async def jwks() -> JSONResponse:
        return JSONResponse(keys.jwks(), headers={"Cache-Control": "public, max-age=120"})

    @router.get("/authorize", **public(_AUTHORIZE_OPENAPI))
    async def authorize(request: Request) -> Response:
        try:
            params = _query(request)
            auth = await service.validate_authorization(params)
        except ClientError as exc:
            return _page("Sign-in error", f"<p class=error>{escape(exc.description)}</p>", 400)
        except OAuthError as exc:
            return _redirect_error(None, params, exc, issuer)
        return _login_form(auth)

    @router.post("/authorize", **public(_AUTHORIZE_LOGIN_OPENAPI))
    async def authorize_login(request: Request) -> Response:
        try:
            form = await _form(request)
            auth = await service.validate_authorization(form)
        except ClientError as exc:
            return _page("Sign-in error", f"<p class=error>{escape(exc.description)}</p>", 400)
        except OAuthError as exc:
            return _page("Sign-in error", f"<p class=error>{escape(exc.description)}</p>", 400)
        client_ip = request.client.host if request.client else "unknown"
        try:
            login = await service.login(
                form.get("tenant", ""), form.get("email", ""), form.get("password", ""), client_ip
            )
        except Throttled as exc:
            page = _login_form(auth, "Too many attempts. Try again later.", 429)
            page.headers["Retry-After"] = str(exc.retry_after)
            return page
        except OAuthError as exc:
            return _login_form(auth, exc.description, 401)
        if login.needs_totp:
            return _totp_form(tickets.seal(login, auth))
        return await _finish(auth, login, totp_passed=False)

    @router.post("/authorize/mfa", **public(_AUTHORIZE_MFA_OPENAPI))
    async def authorize_mfa(request: Request) -> Response:
        try:
            form = await _form(request)
        except OAuthError as exc:
            return _page("Sign-in error", f"<p class=error>{escape(exc.description)}</p>", 400)
        opened = tickets.open(form.get("ticket", ""))
        if opened is None:
            return _page("Sign-in error", "<p class=error>Sign-in expired; start again.</p>", 400)
        login, auth = opened
        client_ip = request.client.host if request.client else "unknown"
        try:
            passed = await service.second_factor(login, form.get("code", "").strip(), client_ip)
        except Throttled as exc:
            page = _totp_form(form["ticket"], "Too many attempts. Try again later.", 429)
            page.headers["Retry-After"] = str(exc.retry_after)
            return page
        if not passed:
            return _totp_form(form["ticket"], "That code is not valid.", 401)
        return await _finish(auth, login, totp_passed=True)

    async def _finish(
        auth: AuthorizationRequest, login: LoginResult, *, totp_passed: bool
    ) -> Response:
        code = await service.issue_code(auth, login, amr_for(login, totp_passed=totp_passed))
        query = {"code": code, "iss": issuer}  # RFC 9207 issuer identification
        if auth.state:
            query["state"] = auth.state
        return RedirectResponse(
            f"{auth.redirect_uri}?{urlencode(query)}", status_code=303, headers=_NO_STORE
        )

    @router.post("/token", **public(_TOKEN_OPENAPI))
    async def token(request: Request) -> Response:
        try:
            form = await _form(request)
            proofs = request.headers.getlist("dpop")
            if len(proofs) != 1:
                raise OAuthError("invalid_dpop_proof", "exactly one DPoP proof is required")
            try:
                accepted = dpop.accept(
                    proofs[0], method="POST", url=token_url, nonce_required=nonce_at_token
                )
            except InvalidDpopProof as exc:
                return _oauth_json_error(OAuthError(exc.error, exc.reason), exc.nonce)
            # Single use across every process on the database too (RFC 9449 section 11.1).
            if replay_store is not None and not await replay_store.first_use(
                "dpop", accepted.replay_key, accepted.expires_at
            ):
                raise OAuthError("invalid_dpop_proof", "proof replayed")
            jkt = accepted.jkt
            grant = form.get("grant_type")
            client_id = form.get("client_id", "")
            if grant == "authorization_code":
                response = await service.exchange_code(
                    code=form.get("code", ""),
                    client_id=client_id,
                    redirect_uri=form.get("redirect_uri", ""),
                    code_verifier=form.get("code_verifier", ""),
                    jkt=jkt,
                )
            elif grant == "refresh_token":
                response = await service.refresh(
                    refresh_token=form.get("refresh_token", ""), client_id=client_id, jkt=jkt
                )
            else:
                raise OAuthError(
                    "unsupported_grant_type",
                    "only authorization_code and refresh_token are supported",
                )
        except OAuthError as exc:
            return _oauth_json_error(exc)
        headers = dict(_NO_STORE)
        if nonce_at_token:
            # Section 8.2: the next nonce comes with the answer, so the client's
            # next request (a refresh) needs no extra round trip.
            headers["DPoP-Nonce"] = dpop.new_nonce()
        return JSONResponse(response.as_json(), headers=headers)

    @router.post("/revoke", response_class=Response, **public(_REVOKE_OPENAPI))
    async def revoke(request: Request) -> Response:
        try:
            form = await _form(request)
        except OAuthError as exc:
            return _oauth_json_error(exc)
        await service.revoke(form.get("token", ""), form.get("client_id", ""))
        return Response(status_code=200, headers=_NO_STORE)

    @router.post("/logout", **public(_LOGOUT_OPENAPI))
    async def logout(request: Request) -> Response:
        try:
            form = await _form(request)
        except OAuthError as exc:
            return _oauth_json_error(exc)
        await service.revoke(form.get("refresh_token", ""), form.get("client_id", ""))
        return _page("Signed out", "<p>You are signed out.</p>")

    @router.get("/userinfo")
    async def userinfo(
        principal: Principal = Depends(guard("account:read", "Account")),
    ) -> dict[str, Any]:
        email, name = await service.profile(
            principal.tenant_id, principal.user_id, principal.db_role
        )
        return {
            "sub": str(principal.user_id),
            "tenant_id": str(principal.tenant_id),
            "roles": list(principal.roles),
            "amr": list(principal.amr),
            "email": email,
            "name": name,
        }

    return router
