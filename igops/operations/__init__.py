"""The operation engine: every mutating command of igops runs through it.

An operation has a kind (`pg-switchover`, `deploy`, …), its targets, a plan of numbered steps,
an operator (user@host, pid) and an optional reason. The engine:

- takes one lease on every resource the operation touches (`conflicts`: which operations
  exclude which), from the local state directory or from etcd (`igops.coordination`);
- writes a write-ahead journal (`journal`): the operation's record, then an entry before each
  step (intent) and after it (result, timing, what a resume needs), then its end;
- audits its start and its end, and stops at the next step boundary if its lease is lost;
- and the plans of `Step`s that failover and `ops abort` run go through `steps.execute`, which
  runs a failed plan's undos and releases.

`igops ops list|show|history|resume|abort` read and act on what it records.
"""
