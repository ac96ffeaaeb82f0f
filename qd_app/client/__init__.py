"""The client side: what a client does for each message (tasks) and its local store."""
