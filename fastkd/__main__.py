from fastkd.cli import main

raise SystemExit(main())
