from pgsynapse.cli import program

program()
