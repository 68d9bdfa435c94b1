"""Online halves of the explanation methods: what the server imports (no fitting code)."""
