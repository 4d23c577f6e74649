"""fastmtl.reference."""
