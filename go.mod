module blindperso

go 1.26.8

require (
	github.com/aead/cmac v0.0.0-20160719120800-7af84192f0b1
	github.com/ebfe/scard v0.0.0-20241214075232-7af069cabc25
	github.com/miekg/pkcs11 v1.1.2
	github.com/rogpeppe/go-internal v1.14.1
	github.com/spf13/cobra v1.10.2
	github.com/stefanberger/go-pkcs11uri v0.0.0-20230803200340-78284954bff6
	golang.org/x/sys v0.26.0
)

require (
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/spf13/pflag v1.0.9 // indirect
	golang.org/x/tools v0.26.0 // indirect
)
