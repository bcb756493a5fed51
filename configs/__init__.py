"""ml_collections configs; each file has get_config(). Shared defaults live in base.py."""
