"""The mesh certificate authority: a CA under $MESHSERVE_HOME/pki and short-lived workload certificates."""
