"""The embedded demo cluster: a Raft-replicated KV store on PySyncObj that speaks raft-announce/1.

`kv` holds the state machine and its replication, `node` one node's CLI and HTTP API, `cluster` a
`DemoCluster` of node subprocesses for tests, `raftlb demo` and benchmarks.
"""
