from pgsynapse.cli import main

raise SystemExit(main())
