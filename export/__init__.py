"""flowturbo.export layer."""
