"""`fastrnn backends`: which backends are available here, why the others are
not, and which one "auto" chooses.
"""



def cmd_backends(args):
    import fastrnn as fr
    from ..backends import resolve
    for name, (ok, why) in fr.available_backends().items():
        print(f"{name:6s} {'yes' if ok else 'no ':3s}  {why}")
    print(f"auto   ->   {resolve('auto')}")
    return 0


def add_parser(sub):
    k = sub.add_parser("backends", help="which backends are available, and why not")
    k.set_defaults(func=cmd_backends)
