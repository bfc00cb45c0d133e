"""flowturbo.training layer."""
