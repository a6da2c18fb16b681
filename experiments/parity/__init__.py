"""Our runs beside the reference trainer's: its initial weights and first steps recorded from
its own environment (record_reference), and our parity runs set seed for seed beside its
records (report)."""
