"""How long each wait of a Postgres switchover, failover or rejoin may take."""

# While writes wait: how long the old primary's clean stop may take, and its last WAL to reach
# the candidate, before the switchover is undone.
STOP_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 10.0
PROMOTE_TIMEOUT = 60
REJOIN_TIMEOUT = 300.0
# repmgrd re-registers with a restarted Postgres once it reconnects: within reconnect_attempts x
# reconnect_interval plus a monitoring interval (6 s + 2 s in the lab, tens of seconds at most).
REPMGRD_RECONNECT_TIMEOUT = 30.0
# How long PgBouncer may take to pause the databases of a dead primary before igops KILLs them.
DEAD_SERVER_PAUSE_S = 2.0
