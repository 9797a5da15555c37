from cifar5m.cli import run

run()
