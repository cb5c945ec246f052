public enum ExprPlaceholder {}
