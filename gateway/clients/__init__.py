"""Programs that use a running gateway over HTTP, as any client would; nothing in the gateway imports them."""
