"""Run reports: stability metrics (SPEC.md section 5), report.md/report.json and plots."""
