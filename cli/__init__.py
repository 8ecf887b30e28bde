"""`dodo-webhooks`, the command line: dev server, send-test, dead letters, database."""
