from normlab.lm.cli import main

raise SystemExit(main())
