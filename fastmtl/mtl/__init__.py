"""fastmtl.mtl."""
