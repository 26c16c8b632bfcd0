"""Recipe configs: plain ml_collections `get_config()` files (big_vision style)."""
