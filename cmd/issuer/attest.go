package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"blindperso/attest"
	"blindperso/issuer"
)

const attestHelp = `Chip attestation (docs/PROTOCOL.md §10): --chip-roots names the PEM file
of the chip-vendor root certificates this issuer trusts (the key
ceremony's chip-roots.pem), --attestation the import policy of the issuer
key: required (a record without a valid attestation is rejected), optional
(imported and marked unattested), off (not checked). The default is
required when --chip-roots is given, else off. Attestations are checked on
the host, with public data only, before the token sees c.`

// attestFlags adds --chip-roots and --attestation and returns what makes
// the issuer key's checker.
func attestFlags(c *cobra.Command) func(is *issuer.Issuer) (*attest.Checker, error) {
	roots := c.Flags().String("chip-roots", "", "PEM file of the chip-vendor root certificates trusted for attestation")
	policy := c.Flags().String("attestation", "", "import policy for chip attestation: required, optional or off (default required with --chip-roots, else off)")
	return func(is *issuer.Issuer) (*attest.Checker, error) {
		p := attest.Off
		if *roots != "" {
			p = attest.Required
		}
		if *policy != "" {
			var err error
			if p, err = attest.ParsePolicy(*policy); err != nil {
				return nil, fmt.Errorf("--attestation: %w", err)
			}
		}
		if p == attest.Off {
			return nil, nil
		}
		if *roots == "" {
			return nil, fmt.Errorf("--attestation %s needs --chip-roots FILE (the chip-vendor roots to check attestations against)", p)
		}
		r, err := attest.LoadRoots(*roots)
		if err != nil {
			return nil, fmt.Errorf("--chip-roots: %w", err)
		}
		return &attest.Checker{Policy: p, Roots: r, Issuer: is.Key.Fingerprint()}, nil
	}
}
