"""Layer 4, views: surprisal tables and their terminal and HTML renderings (templates are
package files). Imports the engine and the layers below it."""
