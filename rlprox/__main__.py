from rlprox.cli import main

raise SystemExit(main())
