from cifar5m.cli.main import run

run()
