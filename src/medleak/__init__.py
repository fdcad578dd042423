"""medleak: patient-level membership-inference audits of medical-imaging models."""
