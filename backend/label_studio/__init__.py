"""What speaks Label Studio: its client and auth, result items out, annotations in, sync, export."""
