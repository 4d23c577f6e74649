"""fastmtl.ops."""
