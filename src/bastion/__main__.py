from bastion.cli import app

app()
