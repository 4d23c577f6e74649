"""fastmtl.nn."""
