"""Who is calling and how much they may use: client API keys and their rate limits."""
