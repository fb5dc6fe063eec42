module blindperso

go 1.26.8

require (
	github.com/aead/cmac v0.0.0-20160719120800-7af84192f0b1
	github.com/ebfe/scard v0.0.0-20241214075232-7af069cabc25
	github.com/miekg/pkcs11 v1.1.2
)
