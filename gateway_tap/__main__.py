from gateway_tap.cli import main

main()
