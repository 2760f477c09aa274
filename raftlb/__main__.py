from raftlb.tools.cli import main

raise SystemExit(main())
