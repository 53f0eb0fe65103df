"""The bus contract: every subject, stream, bucket and message the services exchange."""
