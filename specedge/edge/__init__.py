"""The edge runtime: the draft model, the draft tree and the session loop."""
