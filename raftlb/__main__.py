from raftlb.cli import main

raise SystemExit(main())
