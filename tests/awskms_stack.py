"""A real HTTP stand-in for AWS KMS: moto's server mode on 127.0.0.1.

moto implements the KMS API (and IAM, which signs requests here) in Python;
it is an API-compatible stand-in, not AWS. Authentication is switched on
after the first requests (``INITIAL_NO_AUTH_ACTION_COUNT``), which create
Bastion's IAM user, its policy and its access key, so every later request
is signed and checked: wrong credentials are refused as by AWS.

Credentials reach boto3 as in production, through its own chain: a shared
credentials file with a ``bastion`` profile (and a ``wrong`` one), never a
Bastion setting.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx

from bastion.settings import Settings

REGION = "us-east-1"
MASTER_ALIAS = "alias/bastion-master"
# Requests moto serves before it checks signatures: the four that provision
# Bastion's IAM user below.
_BOOTSTRAP_ACTIONS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Moto:
    """A running moto server, a client with Bastion's credentials, and the files
    boto3 reads them from."""

    process: subprocess.Popen[bytes]
    url: str
    root: Any  # a boto3 KMS client signed with Bastion's (valid) credentials
    credentials_file: Path
    config_file: Path

    def environ(self) -> dict[str, str]:
        """What boto3 needs to find the credentials (a child process's environment)."""
        return {
            "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
            "AWS_CONFIG_FILE": str(self.config_file),
        }

    def settings(self, home: Path, **extra: object) -> Settings:
        values: dict[str, object] = {
            "home": home,
            "secrets_backend": "awskms",
            "awskms_endpoint_url": self.url,
            "awskms_region": REGION,
            "awskms_profile": "bastion",
            "awskms_timeout_seconds": 2.0,
            "master_key_ref": f"awskms://{MASTER_ALIAS}",
        }
        values.update(extra)
        return Settings(**values)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_moto(tmp: Path, wrong_secret: str = "") -> Moto:
    """Start moto on a free port, provision Bastion's IAM user and the master key."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_BOOTSTRAP_ACTIONS)},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)  # not an AWS action: not counted
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)
    bootstrap = {
        "region_name": REGION,
        "endpoint_url": url,
        "aws_access_key_id": "AKIA" + secrets.token_hex(8).upper(),
        "aws_secret_access_key": secrets.token_hex(20),
    }
    iam = boto3.client("iam", **bootstrap)
    iam.create_user(UserName="bastion")
    policy = iam.create_policy(
        PolicyName="bastion-kms",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
            }
        ),
    )
    iam.attach_user_policy(UserName="bastion", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="bastion")["AccessKey"]
    credentials = tmp / "aws-credentials"
    credentials.write_text(
        f"[bastion]\naws_access_key_id = {key['AccessKeyId']}\n"
        f"aws_secret_access_key = {key['SecretAccessKey']}\n"
        f"[wrong]\naws_access_key_id = {key['AccessKeyId']}\n"
        f"aws_secret_access_key = {wrong_secret or secrets.token_hex(20)}\n"
    )
    config = tmp / "aws-config"
    config.write_text("")
    root = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    master = root.create_key(Description="Bastion keystore master key")["KeyMetadata"]["KeyId"]
    root.create_alias(AliasName=MASTER_ALIAS, TargetKeyId=master)
    return Moto(process, url, root, credentials, config)
