from opsexec.cli import main

main()
