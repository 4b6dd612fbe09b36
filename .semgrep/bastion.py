# Rule tests for bastion.yml: `semgrep --test .semgrep/` checks that each
# `ruleid:` line is found and each `ok:` line is not. Never imported or run.
# (tls-verification-off is exercised by hand: its trigger text would trip
# `bastion check repo`'s own TLS lint on this file.)
import os
import subprocess

import jwt
import yaml
from joserfc import jws

_COLUMNS = "id, name"


async def queries(cur, name, column):
    # ruleid: sql-built-from-a-non-constant
    await cur.execute(f"SELECT * FROM t WHERE name = '{name}'")
    # ruleid: sql-built-from-a-non-constant
    await cur.execute(f"UPDATE t SET {column} = %s", (name,))
    # ok: sql-built-from-a-non-constant
    await cur.execute(f"SELECT {_COLUMNS} FROM t WHERE name = %s", (name,))


def commands(name):
    # ruleid: subprocess-through-a-shell
    subprocess.run(name, shell=True)
    # ruleid: subprocess-through-a-shell
    os.system(name)
    # ok: subprocess-through-a-shell
    subprocess.run(["git", "log", name], check=True)


def documents(data):
    # ruleid: unsafe-yaml-load
    yaml.load(data)
    # ok: unsafe-yaml-load
    yaml.load(data, Loader=yaml.SafeLoader)


def compare(signature, expected):
    # ruleid: secret-compared-with-equals
    if signature == expected:
        return True
    return False


def tokens(token, key):
    # ruleid: jwt-without-algorithm-allow-list
    jwt.decode(token, key)
    # ruleid: jwt-without-algorithm-allow-list
    jws.deserialize_compact(token, key)
    # ok: jwt-without-algorithm-allow-list
    return jws.deserialize_compact(token, key, algorithms=["Ed25519"])
