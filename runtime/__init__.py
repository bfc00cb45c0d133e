"""flowturbo.runtime layer."""
