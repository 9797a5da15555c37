from cifar5m.cli import main

main()
