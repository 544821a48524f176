"""Small shared helpers: rank-aware logging, distributed info, atomic writes, seeding."""
