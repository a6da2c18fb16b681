"""The replication's published records as our study's workdirs (importer), and the reads
compared over any set of runs, per run and pooled (analyze)."""
