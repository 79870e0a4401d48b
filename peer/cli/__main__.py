from peer.cli.main import entry

entry()
