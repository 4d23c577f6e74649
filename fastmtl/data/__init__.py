"""fastmtl.data."""
